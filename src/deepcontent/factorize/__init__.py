"""Weighted matrix factorisation (implicit ALS): the WMF objective, backends behind one factory
(``reference`` numpy oracle, ``implicit`` CPU/GPU, ``spark`` MLlib), and fold-in."""

from deepcontent.factorize.factory import make_factorizer

__all__ = ["make_factorizer"]
