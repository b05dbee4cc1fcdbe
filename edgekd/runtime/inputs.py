"""Expanding `edgekd predict` inputs (files, folders, globs) into an ordered list of images (paths, DICOM frames)."""

from __future__ import annotations

import glob
from pathlib import Path

from edgekd.errors import EdgeKDError
from edgekd.imageio import (IMAGE_SUFFIXES, DicomFrame, dicom_frames, folder_files, is_dicom, is_file_or_broken_link,
                            is_image_file, subfolders)


def collect_inputs(specs: list[str | Path], frame: int | None = None, skipped: list[Path] | None = None,
                   repeated: list[Path] | None = None) -> tuple[list[Path | DicomFrame], list[tuple[str, str]]]:
    """Files as given, folders recursively (sorted; files with an image suffix, and DICOM files of any name, so a
    folder of a series works), globs expanded (sorted) and read as folders are (a matched folder's images, files
    that are no image left out). A multi-frame DICOM becomes one input per frame
    (`file.dcm#frame3`), or only frame `frame` (1-based) when given.

    Returns (inputs, problems): a spec matching nothing is a (spec, message) problem, not an exception,
    so one typo does not stop a batch run. A file reached twice (given twice, or through a link) is kept once, at its
    first position; `repeated`, if given, gets the later paths. `skipped`, if given, gets the files of a folder or
    pattern left out as not images, each once (hidden files, such as .DS_Store, not counted)."""
    if isinstance(specs, (str, Path)):  # one spec given bare had been read letter by letter
        specs = [specs]
    paths: list[Path] = []
    problems: list[tuple[str, str]] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            paths.append(p)
        elif repeated is not None:
            repeated.append(p)

    left_out: set[Path] = set()  # a file of two folders given (one inside the other) is counted once

    def folder_images(path: Path, text: str | None) -> list[Path]:
        """The folder's images (`images_of`); `text`: the spec to name when it holds none."""
        said = len(problems)  # a subfolder that cannot be listed: a problem, the rest read
        found = images_of(folder_files(path, problems), skipped, left_out)  # through symlinked folders; hidden
        if not found and text is not None and len(problems) == said:  # files left out
            problems.append((text, f"{path}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))} or DICOM)"))
        return found

    for spec in specs:
        text = str(spec)
        path = Path(text)
        if path.is_dir():
            for p in folder_images(path, text):
                add(p)
        elif path.exists():
            add(path)
        elif glob.has_magic(text):  # read as a folder is: a matched folder's images (data/*: its class folders),
            found = sorted(Path(p) for p in glob.glob(text, recursive=True))  # files that are no image left out and
            deep = "**" in text  # counted, broken links kept (then unreadable); data/**: glob matched every file
            files = [p for p in found if not p.is_dir() and is_file_or_broken_link(p)]
            images = images_of(files, skipped, left_out)
            images += [q for p in found if p.is_dir() and not deep for q in folder_images(p, None)]
            if not images:
                problems.append((text, f"{text}: pattern matches no " + ("images" if files else "files")))
            for p in sorted(images):
                add(p)
        else:
            problems.append((text, f"{path}: no such file or folder"))
    return [item for p in paths for item in frames_of(p, frame)], problems


def images_of(files: list[Path], skipped: list[Path] | None, counted: set[Path]) -> list[Path]:
    """The images among `files` (of a folder or a pattern); the others go to `skipped`, each file once (`counted`:
    the resolved paths already there)."""
    found = [p for p in files if is_image_file(p)]
    images = set(found)
    for p in files if skipped is not None else ():
        if p not in images and p.resolve() not in counted:
            counted.add(p.resolve())
            skipped.append(p)
    return found


def frames_of(path: Path, frame: int | None = None) -> list[Path | DicomFrame]:
    """A multi-frame DICOM -> each of its frames (or frame `frame`, 1-based); any other file -> itself (an
    unreadable DICOM too: reading it reports the error for that file)."""
    if not is_dicom(path):
        return [path]
    try:
        count = dicom_frames(path)
    except EdgeKDError:
        return [path]
    if frame is not None and (count > 1 or frame > 1):
        return [DicomFrame(path, frame - 1)]  # a frame past the end is reported when the frame is read
    if count == 1:
        return [path]
    return [DicomFrame(path, i) for i in range(count)]


def collect_labelled(root: str | Path, class_names: list[str]) -> tuple[list[Path], list[int]]:
    """A labelled folder in the ImageFolder layout (root/<class name>/<images>, searched recursively) -> its image
    paths and class indices in `class_names` (the bundle's order). A one-head model over several tasks names its
    classes TASK:CLASS: a folder named CLASS stands for the one such name (a ':' cannot be in a Windows folder
    name). A sub-folder that is not a class of the model, a multi-frame DICOM, or no image at all, is a one-line
    error."""
    root = Path(root)
    if not root.is_dir():
        raise EdgeKDError(f"--data {root}: not a folder (give a labelled folder: one sub-folder per class)")
    folders = subfolders(root)
    by_task = {}
    for name in class_names:
        by_task.setdefault(name.split(":", 1)[-1], []).append(name)
    index = {**{short: class_names.index(full[0]) for short, full in by_task.items() if len(full) == 1},
             **{name: i for i, name in enumerate(class_names)}}
    unknown = [p.name for p in folders if p.name not in index]
    if unknown:
        nested = next((root / name for name in unknown
                       if any(d.name in index for d in subfolders(root / name))), None)
        twice = by_task.get(unknown[0], [])
        hint = (f"; {nested.name}/ holds class folders, as a split folder does: give it, --data {nested}"
                if nested is not None else f"; name the folder after one of {', '.join(twice)}" if twice else "")
        raise EdgeKDError(f"--data {root}: sub-folder '{unknown[0]}' is not a class of the model "
                          f"({', '.join(class_names)}){hint}")
    paths: list[Path] = []
    labels: list[int] = []
    for folder in folders:
        found, _ = collect_inputs([folder])
        frame = next((p for p in found if isinstance(p, DicomFrame)), None)
        if frame is not None:  # each frame would be scored as an image of the folder's class (training refuses it)
            raise EdgeKDError(f"--data {root}: {frame.path}: a DICOM of {dicom_frames(frame.path)} frames (a labelled "
                              "folder takes one image per file, as training does: save the frame you mean as its "
                              "own image)")
        paths += found
        labels += [index[folder.name]] * len(found)
    if not paths:
        raise EdgeKDError(f"--data {root}: no images in sub-folders named after the classes ({', '.join(class_names)})")
    return paths, labels
