"""The filesystem Ray Train persists checkpoints through: the Storage's own pyarrow filesystem,
without S3 directory markers.

Ray Train (``RunConfig(storage_path=..., storage_filesystem=...)``) calls ``create_dir`` before
it writes a run's files and ``pyarrow.fs.copy_files`` for every checkpoint. On S3, pyarrow turns
``create_dir`` into empty "directory marker" objects (``root/``, ``root/train/``, ...) for every
level of the path; S3 has no directories and some S3-compatible servers refuse such keys where
a prefix already holds objects (the embedded ``rclone serve s3`` answers ``InternalError``).
:func:`checkpoint_filesystem` wraps an S3 filesystem so that ``create_dir`` does nothing (a
prefix exists as soon as an object is written under it) and deleting a "directory" deletes the
objects under it (never marker keys); everything else is delegated. Local filesystems are
returned unchanged.
"""

from __future__ import annotations

import pyarrow.fs as pafs

__all__ = ["checkpoint_filesystem"]


class _NoDirectoryMarkers(pafs.FileSystemHandler):
    """A :class:`pyarrow.fs.FileSystemHandler` delegating to ``fs`` except ``create_dir``."""

    def __init__(self, fs: pafs.FileSystem) -> None:
        self.fs = fs

    def __eq__(self, other) -> bool:
        return isinstance(other, _NoDirectoryMarkers) and self.fs.equals(other.fs)

    def __ne__(self, other) -> bool:
        return not self == other

    def __reduce__(self):  # picklable: Ray ships the filesystem to its controller and workers
        return (_NoDirectoryMarkers, (self.fs,))

    def get_type_name(self) -> str:
        return f"nodirmarkers+{self.fs.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        pass  # S3 prefixes need no marker objects

    def _delete_files_under(self, path: str, *, missing_ok: bool) -> None:
        # Objects only: pyarrow's delete_dir also deletes the marker keys of sub-"directories",
        # which servers without markers reject; with the objects gone the prefix is gone.
        selector = pafs.FileSelector(path, recursive=True, allow_not_found=missing_ok)
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.File:
                self.fs.delete_file(info.path)

    def delete_dir(self, path: str) -> None:
        self._delete_files_under(path, missing_ok=False)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._delete_files_under(path, missing_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise PermissionError("refusing to delete the whole bucket through the checkpoint filesystem")

    def delete_file(self, path: str) -> None:
        self.fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path: str):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path: str):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)


def checkpoint_filesystem(fs: pafs.FileSystem) -> pafs.FileSystem:
    """``fs`` for Ray Train's ``storage_filesystem``: S3 without directory markers, other
    filesystems unchanged."""
    if isinstance(fs, pafs.S3FileSystem):
        return pafs.PyFileSystem(_NoDirectoryMarkers(fs))
    return fs
