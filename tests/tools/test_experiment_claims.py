"""tools.experiment_claims: when a claim was defined, read from the git history of a claims file made here, and
whether that was before the records it reads (else "post hoc")."""

import os
import subprocess
import time

import pytest

from tools import experiment_claims as ec
from tools import experiment_report as rep

CLAIMS_V1 = '''MODES = ("t1", "flair")
CLAIMS = (
    ("cmer", "cam", "fused", "CMER > CAM"),
)
'''
CLAIMS_V2 = '''MODES = ("t1", "flair")


def _claims():
    claims = [("cmer", "fused", "cam", "fused", "CMER > CAM")]
    for m in MODES:
        claims.append(("cmer_rotation", m, "cam", m, f"rotation > CAM, {m}"))
    return tuple(claims)


CLAIMS = _claims()
'''


def _git(root, *args, when=None):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    if when is not None:
        env.update(GIT_AUTHOR_DATE=f"@{when} +0000", GIT_COMMITTER_DATE=f"@{when} +0000")
    out = subprocess.run(["git", *args], cwd=root, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _commit(root, name, text, when):
    (root / name).write_text(text)
    _git(root, "add", name)
    _git(root, "commit", "-q", "-m", f"at {when}", when=when)
    return _git(root, "rev-parse", "--short", "HEAD")


def _date(stamp):
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(stamp))


@pytest.fixture()
def repo(tmp_path):
    _git(tmp_path, "init", "-q")
    t0 = 1_800_000_000
    first = _commit(tmp_path, "claims.py", CLAIMS_V1, t0)
    cam_run = _commit(tmp_path, "other.txt", "a run's code", t0 + 600)  # the CAM and rotation records ran here
    second = _commit(tmp_path, "claims.py", CLAIMS_V2, t0 + 3600)
    later_run = _commit(tmp_path, "other.txt", "later", t0 + 7200)
    return tmp_path, {"first": first, "cam_run": cam_run, "second": second, "later_run": later_run, "t0": t0}


def test_claims_are_rebuilt_from_each_version_without_importing_it():
    assert ec.claims_from_source(CLAIMS_V1) == [("cmer", "fused", "cam", "fused")]
    assert ec.claims_from_source(CLAIMS_V2)[1:] == [("cmer_rotation", "t1", "cam", "t1"),
                                                     ("cmer_rotation", "flair", "cam", "flair")]
    assert ec.claims_from_source("x = 1\n") is None
    # the committed claims file parses the same way, and gives the claims the report tests
    text = (rep.BUNDLE_ROOT / ec.CLAIMS_FILE).read_text()
    assert ec.claims_from_source(text) == [ec.claim_key(c) for c in rep.CLAIMS]


def test_a_claim_defined_after_a_record_it_reads_is_post_hoc(repo):
    root, c = repo
    claims = [("cmer", "fused", "cam", "fused", "CMER > CAM"), ("cmer_rotation", "t1", "cam", "t1", "rotation, t1")]
    registration = ec.Registration(claims, root=root, path="claims.py")
    assert [v["commit"][:7] for v in registration.versions] == [c["first"], c["second"]]
    cam = {"commit": c["cam_run"], "date": _date(c["t0"] + 600)}
    rotation_late = {"commit": c["later_run"], "date": _date(c["t0"] + 7200)}
    main = registration.check(claims[0], {("cam", "seed0"): cam, ("cmer", "seed0"): rotation_late})
    assert main["defined_commit"] == c["first"] and main["post_hoc"] is False  # unchanged since the first version
    fig3 = registration.check(claims[1], {("cam", "seed0"): cam, ("cmer_rotation", "seed0"): rotation_late})
    assert fig3["defined_commit"] == c["second"] and fig3["post_hoc"] is True
    assert fig3["post_hoc_records"] == ["seed0/cam"]  # the CAM record existed before the claim
    # a record whose commit git does not know: its date decides
    foreign = {"commit": "0000000", "date": _date(c["t0"] + 9000)}
    assert registration.check(claims[1], {("cam", "seed9"): foreign})["post_hoc"] is False
    # a claim the history lacks (working tree only) is uncommitted, hence post hoc against any record
    new = ("cmer", "t1", "cam", "t1", "new")
    late = ec.Registration([new], root=root, path="claims.py").check(new, {("cam", "seed0"): cam})
    assert late["defined_commit"] == ec.UNCOMMITTED and late["post_hoc"] is True


def test_without_git_history_the_status_is_unknown(tmp_path):
    registration = ec.Registration([("a", "fused", "b", "fused", "x")], root=tmp_path, path="claims.py")
    assert registration.check(("a", "fused", "b", "fused", "x"), {})["post_hoc"] is None


def test_the_document_marks_post_hoc_claims(repo):
    root, c = repo
    rows = lambda level: rep.run_record([{"subject": f"s{i}", "map": m, "dsc": level + 0.01 * i, "assd": 1.0,
                                          "tp": 1, "fp": 1, "fn": 1, "empty_case": ""}
                                         for i in range(8) for m in ("t1", "flair", "fused")])
    runs = {"cmer": {"seed0": rows(0.5)}, "cam": {"seed0": rows(0.2)}, "cmer_rotation": {"seed0": rows(0.4)}}
    provenance = {"seed0/cmer": {"commit": c["later_run"], "date": _date(c["t0"] + 7200)},
                  "seed0/cam": {"commit": c["cam_run"], "date": _date(c["t0"] + 600)},
                  "seed0/cmer_rotation": {"commit": c["later_run"], "date": _date(c["t0"] + 7200)}}
    claims = (("cmer", "fused", "cam", "fused", "CMER > CAM"), ("cmer_rotation", "t1", "cam", "t1", "rotation, t1"))
    data = {"runs": runs, "seeds": [0], "provenance": provenance, "statistics": {}}
    out = rep.compare_claims(data, claims, registration=ec.Registration(claims, root=root, path="claims.py"))
    assert [o["post_hoc"] for o in out] == [False, True]
