"""Checks of a datalist's sections: every subject once, in one section, with files of its own.

Folder discovery refuses a subject found twice (`scripts.data.subjects`); a datalist written
by hand (or edited) can list a subject twice in training (counted twice), in training and in
validation or testing (its validation / test figures then measure memory, not the method),
or the same files under two ids. `check_datalist_sections` refuses each with the entry named,
for any datalist a run uses, written by this bundle or not (`scripts.data.datalist.ensure_dataset`).
"""

from __future__ import annotations

import os
from pathlib import Path

from scripts.data.subjects import DataError, _read_json, _sections_present, load_datalist

REWRITE = "python -m scripts.data.datalist datalist --data DIR --out {json}"


def _files(record: dict) -> list[tuple[str, str]]:
    """(role, real path) of each file of a record (its modalities or its 4D image; not its seg)."""
    if "image4d" in record:
        return [("image", os.path.realpath(record["image4d"]))]
    return [(role, os.path.realpath(path)) for role, path in record.get("images", {}).items()]


def check_datalist_sections(json_path) -> None:
    """Raise DataError when a datalist lists a subject twice in a section, in two sections, one
    file for two subjects (or two modalities of one subject).

    Args:
        json_path: the datalist JSON (decathlon style; `scripts.data.subjects.load_datalist` reads it).
    """
    json_path = Path(json_path).expanduser().absolute()
    datalist = _read_json(json_path, "datalist")
    fix = f"Fix: edit {json_path.name} so that each subject and file appears once, or write a split with `{REWRITE.format(json=json_path)}`."
    sections: dict[str, str] = {}  # subject -> its section
    owners: dict[str, tuple[str, str]] = {}  # real file path -> (subject, section)
    for section in _sections_present(datalist):
        for record in load_datalist(json_path, section):
            subject = str(record["subject"])
            if subject in sections:
                where = (f"is listed twice in {section!r} (it would count twice)" if sections[subject] == section else
                         f"is in both {sections[subject]!r} and {section!r} (a subject seen in training inflates "
                         f"validation and test figures)")
                raise DataError(f"datalist {json_path}: subject {subject} {where}. {fix}")
            sections[subject] = section
            roles: dict[str, str] = {}
            for role, path in _files(record):
                if path in roles.values():
                    other = next(r for r, p in roles.items() if p == path)
                    raise DataError(f"datalist {json_path}: subject {subject} gives one file {path} as both {other} and "
                                    f"{role}. Fix: point each modality of {subject} at its own file.")
                roles[role] = path
                if path in owners:
                    owner, owner_section = owners[path]
                    raise DataError(f"datalist {json_path}: file {path} is listed for subject {owner} "
                                    f"({owner_section!r}) and for subject {subject} ({section!r}): one scan under two "
                                    f"ids. {fix}")
                owners[path] = (subject, section)
