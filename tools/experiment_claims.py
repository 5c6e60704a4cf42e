"""When each of the paper's claims was fixed, and whether it was fixed before the records that test it.

A claim (better run and map, worse run and map) is a test committed in the claims file
(`CLAIMS_FILE`, `tools/experiment_report.py`'s CLAIMS). Its definition commit is the oldest commit of
that file from which on the claim is defined unchanged: every committed version of the file is read
(`git log` + `git show`), its claim list rebuilt from the source without importing it (a literal
`CLAIMS = (...)` or the `_claims()` function, run on the file's own constants), and the claim's
(better, better map, worse, worse map) looked up. A claim defined only in the working tree is
"uncommitted".

A claim reads the records of its two runs ('cam@t1_t2' and 'cam.gradcampp' read the record 'cam')
for every seed. It is **pre-registered** when its definition commit precedes each of them: the
definition commit is an ancestor of (or equal to) the record's `commit` field (the code the run ran
on), or, where git cannot resolve that commit, the definition's commit time is not later than the
record's `date`. Otherwise it is **post hoc**: the claim was written after some of its evidence
existed. Without git the status is unknown (None).
"""

from __future__ import annotations

import ast
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

from scripts.common import MODALITIES

ROOT = Path(__file__).resolve().parents[1]
CLAIMS_FILE = "tools/experiment_report.py"
UNCOMMITTED = "uncommitted"


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=False)


def claim_key(claim) -> tuple:
    """(better, better map, worse, worse map) of a claim tuple, in the current 5-field form or the first
    4-field form (better, worse, map, label)."""
    claim = tuple(claim)
    if len(claim) == 4:
        better, worse, name, _ = claim
        return (better, name, worse, name)
    return tuple(claim[:4])


def claims_from_source(source: str) -> list[tuple] | None:
    """The claim keys a version of the claims file defines, rebuilt without importing it; None when it defines none.

    Args:
        source: the text of the claims file.
    """
    tree = ast.parse(source)
    constants = {"MODALITIES": tuple(MODALITIES)}
    function = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                constants[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
        elif isinstance(node, ast.FunctionDef) and node.name == "_claims":
            function = node
    if isinstance(constants.get("CLAIMS"), tuple):
        return [claim_key(c) for c in constants["CLAIMS"]]
    if function is None:
        return None
    namespace = dict(constants)
    exec(compile(ast.Module(body=[function], type_ignores=[]), "<claims>", "exec"), namespace)  # noqa: S102 (our own history)
    return [claim_key(c) for c in namespace["_claims"]()]


def history(root: Path = ROOT, path: str = CLAIMS_FILE) -> list[dict]:
    """The committed versions of the claims file, oldest first: [{commit, time (epoch s), claims (set)}].

    Versions that cannot be read are left out; an empty list without git.
    """
    log = _git(root, "log", "--format=%H %ct", "--", path)
    if log.returncode != 0:
        return []
    versions = []
    entries = [line.split() for line in log.stdout.splitlines() if line.strip()]
    for commit, stamp in reversed(entries):
        shown = _git(root, "show", f"{commit}:{path}")
        if shown.returncode != 0:
            continue
        try:
            claims = claims_from_source(shown.stdout)
        except Exception:  # an old version that no longer runs: it fixes nothing we can read
            claims = None
        if claims is not None:
            versions.append({"commit": commit, "time": int(stamp), "claims": set(claims)})
    return versions


def definition_commits(claims, versions: list[dict]) -> dict[tuple, dict]:
    """{claim key: {commit, time}} of the oldest version from which on each claim is defined without a gap
    up to the newest version; {commit: 'uncommitted', time: now} for a claim the newest version lacks."""
    out = {}
    for claim in claims:
        key = claim_key(claim)
        found = None
        for version in reversed(versions):
            if key not in version["claims"]:
                break
            found = version
        out[key] = ({"commit": found["commit"], "time": found["time"]} if found
                    else {"commit": UNCOMMITTED, "time": int(time.time())})
    return out


def parse_date(text: str | None) -> float | None:
    """Epoch seconds of a record's 'YYYY-MM-DD HH:MM UTC' date (None when absent or unreadable)."""
    try:
        return datetime.strptime(str(text), "%Y-%m-%d %H:%M UTC").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


class Registration:
    """Pre-registered or post hoc, per claim, against the records it reads (module docstring).

    Args:
        claims: the claim tuples.
        root: the repository (git) root.
        path: the claims file, relative to `root`.
        versions: the claims file's history (`history`); read from git when None.
    """

    def __init__(self, claims, root: Path = ROOT, path: str = CLAIMS_FILE, versions: list[dict] | None = None):
        self.root = Path(root)
        self.versions = history(self.root, path) if versions is None else versions
        self.defined = definition_commits(claims, self.versions)
        self._ancestry: dict[tuple, bool | None] = {}

    def _is_ancestor(self, commit: str, record_commit: str | None) -> bool | None:
        """Whether `commit` is an ancestor of (or equal to) `record_commit`; None when git cannot tell."""
        if not record_commit or record_commit == "unknown":
            return None
        key = (commit, record_commit)
        if key not in self._ancestry:
            known = _git(self.root, "cat-file", "-e", f"{record_commit}^{{commit}}").returncode == 0
            self._ancestry[key] = (None if not known else
                                   _git(self.root, "merge-base", "--is-ancestor", commit, record_commit).returncode == 0)
        return self._ancestry[key]

    def check(self, claim, records: dict) -> dict:
        """{defined_commit, defined_at, post_hoc (bool or None), post_hoc_records} of one claim.

        Args:
            claim: the claim tuple.
            records: {(record name, seed key): {commit, date}} of the records the claim reads.
        """
        defined = self.defined.get(claim_key(claim))
        out = {"defined_commit": None, "defined_at": None, "post_hoc": None, "post_hoc_records": []}
        if not self.versions or defined is None:
            return out
        out["defined_commit"] = defined["commit"][:7] if defined["commit"] != UNCOMMITTED else UNCOMMITTED
        out["defined_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(defined["time"]))
        late = []
        for (name, seed), record in sorted(records.items()):
            if defined["commit"] == UNCOMMITTED:  # defined now: every existing record came first
                late.append(f"{seed}/{name}")
                continue
            before = self._is_ancestor(defined["commit"], record.get("commit"))
            if before is None:
                stamp = parse_date(record.get("date"))
                before = None if stamp is None else defined["time"] <= stamp + 59  # the record keeps minutes
            if before is False:
                late.append(f"{seed}/{name}")
        out["post_hoc"], out["post_hoc_records"] = bool(late), late
        return out
