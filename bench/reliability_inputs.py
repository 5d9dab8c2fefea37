"""Bad inputs for the reliability suite (bench/reliability.py): every parameter key with generated bad values,
bad inputs through real stage commands, corrupted files of every checked kind, a full disk and a read-only
output directory, and a queued experiment run beside a running `dvc repro`."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
import typing
from pathlib import Path

import yaml

from bench.reliability_repo import cache_objects, differences, dvc, env, stray_temps


def _leaf_hint(cls: type, key: str):
    for part in key.split(".")[:-1]:
        cls = typing.get_type_hints(cls)[part]
    return typing.get_type_hints(cls)[key.split(".")[-1]]


def bad_values(hint) -> list[tuple[str, object]]:
    """A wrong-type and an out-of-range value for a key of this type, from the type alone."""
    origin = typing.get_origin(hint)
    if hint is bool:
        return [("type", "yes")]
    if hint is int:
        return [("type", "ten"), ("range", -(10**9))]
    if hint is float:
        return [("type", "ten"), ("range", -1e9), ("range", float("nan"))]
    if hint is str:
        return [("type", 12), ("range", "")]
    if origin is typing.Literal:
        return [("type", 3.5), ("range", "no_such_choice")]
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return [("type", "x"), ("range", [-(10**9)] if item in (int, float) else [""])]  # an empty name
    return [("type", 3.5)]


def _set(raw: dict, key: str, value) -> dict:
    raw = copy.deepcopy(raw)
    node = raw
    for part in key.split(".")[:-1]:
        node = node.setdefault(part, {})
    node[key.split(".")[-1]] = value
    return raw


def parameter_catalogue(repo: Path, work: Path) -> dict:
    """Every key, every generated bad value, through the loader the stages call; what it said."""
    from sae_ortho.base import params as params_mod
    from sae_ortho.base import study_params
    from sae_ortho.base.schema import ParamError, schema_rows

    files = [
        (params_mod.Params, repo / "params.yaml", params_mod.load),
        (study_params.StudyParams, repo / "study/params.yaml", study_params.load_study),
    ]
    tried, rejected, accepted, unclean = 0, 0, [], []
    for cls, path, loader in files:
        raw = yaml.safe_load(path.read_text())
        for key, *_ in schema_rows(cls):
            default = _get(raw, key)
            for kind, value in bad_values(_leaf_hint(cls, key)):
                if value == default:  # e.g. an empty list where empty is the default: not out of range
                    continue
                tried += 1
                bad = work / "bad.yaml"
                bad.write_text(yaml.safe_dump(_set(raw, key, value)))
                try:
                    loader(bad)
                    accepted.append(f"{key}={value!r} ({kind})")
                except ParamError as err:
                    rejected += 1 if key in str(err) else 0
                    if key not in str(err):
                        unclean.append(f"{key}={value!r}: message names another key: {err}")
                except Exception as err:  # noqa: BLE001 (anything but ParamError is a finding)
                    unclean.append(f"{key}={value!r}: {type(err).__name__}: {err}")
    return {"tried": tried, "rejected_cleanly": rejected, "accepted": accepted, "unclean": unclean}


def _get(raw: dict, key: str):
    node = raw
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def one_line_error(stderr: str) -> bool:
    """The stage ended with one error line, last, and no traceback (progress bars before it are progress)."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    return bool(lines) and lines[-1].startswith("error:") and len(errors) == 1 and "Traceback" not in stderr


def _listing(repo: Path) -> list[str]:
    return sorted(str(p.relative_to(repo)) for d in ("data", "models", "metrics") for p in (repo / d).rglob("*"))


def stage_inputs(repo: Path) -> list[dict]:
    """Bad inputs through real stage commands: each must give one line on stderr and a non-zero exit
    before writing anything."""
    cases = []

    def case(name: str, cmd: list[str], prepare, restore) -> None:
        before = cache_objects(repo), _listing(repo)
        prepare()
        out = subprocess.run([sys.executable, "-m", *cmd], cwd=repo, env=env(), capture_output=True, text=True)
        restore()
        lines = out.stderr.strip().splitlines()
        after = cache_objects(repo), _listing(repo)
        ok = out.returncode != 0 and one_line_error(out.stderr) and before == after
        cases.append(
            {
                "case": name,
                "exit": out.returncode,
                "stderr": lines[-3:],
                "clean": ok,
                "nothing_written": before == after,
            }
        )

    params = (repo / "params.yaml").read_text()
    corpus = repo / "data" / "corpus.parquet"
    saved = repo / "corpus.saved"

    def set_params(**change) -> None:
        raw = yaml.safe_load(params)
        for key, value in change.items():
            raw = _set(raw, key.replace("__", "."), value)
        (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    def restore_params() -> None:
        (repo / "params.yaml").write_text(params)

    case(
        "wrong type (train.k: ten)",
        ["stages.train", "--name", "ortho"],
        lambda: set_params(train__k="ten"),
        restore_params,
    )
    case(
        "out of range (train.lr: -1)",
        ["stages.train", "--name", "ortho"],
        lambda: set_params(train__lr=-1.0),
        restore_params,
    )
    case("a layer the model lacks (layer: 99)", ["stages.extract"], lambda: set_params(layer=99), restore_params)
    case("missing corpus", ["stages.extract"], lambda: corpus.rename(saved), lambda: saved.rename(corpus))

    def empty_corpus() -> None:
        import pandas as pd

        corpus.rename(saved)
        pd.DataFrame({"doc_id": [], "source": [], "text": []}).to_parquet(corpus)

    case("empty corpus", ["stages.extract"], empty_corpus, lambda: saved.replace(corpus))
    return cases


# A file of each checked kind in the tiny repository, and a stage command that reads it.
CORRUPTIONS = [
    ("data/activations/shard_00001.safetensors", ["stages.train", "--name", "ortho"]),
    ("data/activations/index/shard_00003.parquet", ["stages.llm_cache"]),  # the last shard: held-out starts after it
    ("data/activations/manifest.json", ["stages.train", "--name", "ortho"]),
    ("models/ortho/sae_state.safetensors", ["stages.core", "--sae", "ortho", "--dir", "models/ortho"]),
    ("models/ortho/pairs.parquet", ["stages.stability"]),
    ("models/ortho/snapshots.safetensors", ["stages.stability"]),
    ("data/heldout/heldout.safetensors", ["stages.core", "--sae", "ortho", "--dir", "models/ortho"]),
    ("data/probe_acts/review_sentiment.safetensors", ["stages.probing", "--sae", "ortho", "--dir", "models/ortho"]),
    (
        "data/letters/seed_0/absorption_acts.safetensors",
        ["stages.absorption", "--sae", "ortho", "--dir", "models/ortho"],
    ),
    ("data/letters/tokenizer/tokenizer.json", ["stages.absorption", "--sae", "ortho", "--dir", "models/ortho"]),
]


def corruption(repo: Path) -> list[dict]:
    """Each file flipped by one byte, then truncated to half: its reader must stop with one line naming it
    and `dvc checkout --force <file>` (the advice the line gives) must bring the recorded bytes back."""
    results = []
    for rel, cmd in CORRUPTIONS:
        path = repo / rel
        if not path.exists():
            results.append({"file": rel, "skipped": "not in this pipeline"})
            continue
        original = path.read_bytes()
        for how in ("flip", "truncate"):
            data = bytearray(original)
            if how == "flip":
                data[len(data) // 2] ^= 0x01
            else:
                del data[len(data) // 2 :]
            path.unlink()  # DVC may have linked the file to its cache: never write through the link
            path.write_bytes(bytes(data))
            out = subprocess.run([sys.executable, "-m", *cmd], cwd=repo, env=env(), capture_output=True, text=True)
            lines = out.stderr.strip().splitlines()
            restored = dvc(repo, "checkout", "--force", rel)
            results.append(
                {
                    "file": rel,
                    "damage": how,
                    "exit": out.returncode,
                    "stderr": lines[-2:],
                    "one_line_naming_it": out.returncode != 0 and one_line_error(out.stderr) and rel in lines[-1],
                    "checkout_restores": restored.returncode == 0 and path.read_bytes() == original,
                }
            )
    return results


def disk_faults(repo: Path, ref_lock: dict, ref_files: dict) -> list[dict]:
    """A disk that fills mid-write and a read-only output directory, under the train stage (its checkpoints
    and its SAE go to models/): a small tmpfs mounted over models/ where this machine allows it."""
    results = []
    target = repo / "models"
    for name, options in (("disk full", "size=256k"), ("read-only", "size=64m,ro")):
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
        cmd = [sys.executable, "-m", "stages.train", "--name", "ortho"]
        how = "tmpfs over models/"
        if mounted.returncode != 0:  # no mount here: a file-size limit stands for the full disk
            if name == "read-only":
                results.append({"case": name, "skipped": "cannot mount a filesystem on this machine"})
                continue
            cmd, how = ["bash", "-c", "ulimit -f 256 && exec " + " ".join(cmd)], "ulimit -f 256 (KiB)"
        out = subprocess.run(cmd, cwd=repo, env=env(), capture_output=True, text=True)
        half_written = stray_temps(repo) + (
            [str(p) for p in target.rglob("*") if p.is_file()] if mounted.returncode == 0 else []
        )
        if mounted.returncode == 0:
            subprocess.run(["umount", str(target)], check=True)
        lines = out.stderr.strip().splitlines()
        rerun = dvc(repo, "repro", "-s", "train")
        results.append(
            {
                "case": name,
                "how": how,
                "exit": out.returncode,
                "stderr": lines[-3:],
                "one_line": out.returncode != 0 and one_line_error(out.stderr),
                "half_written": half_written,
                "rerun_identical": rerun.returncode == 0 and not differences(repo, "train", ref_lock, ref_files),
            }
        )
    return results


def concurrency(repo: Path, ref_lock: dict, ref_files: dict) -> dict:
    """A queued experiment (`dvc exp run --queue -S tau=...`, run by `dvc queue start`) beside a `dvc repro`
    of train in the workspace: both must finish, the workspace's outputs equal the reference's, the
    experiment records its own tau and metrics, and no temporary is left behind."""
    name = "queued-beside-repro"
    # The experiment reproduces train (and what it needs) only: the whole pipeline in the experiment's own
    # workspace took ~19 min here (most stages rerun there), the same code path at many times the cost.
    queued = dvc(repo, "exp", "run", "train", "--queue", "-S", "tau=0.05", "--name", name)
    running = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "-f", "-s", "train"],
        cwd=repo,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started = dvc(repo, "queue", "start", "-j", "1")
    deadline, status = time.time() + 900, ""
    while time.time() < deadline:
        status = dvc(repo, "queue", "status").stdout
        if not any(word in status for word in ("Queued", "Running")):
            break
        time.sleep(5)
    _, repro_err = running.communicate()
    dvc(repo, "queue", "stop")
    shown = dvc(repo, "exp", "show", "--json")
    exp = _experiment(shown.stdout, name)
    result = {
        "queued": queued.returncode == 0,
        "queue_started": started.returncode == 0,
        "queue_status": status.strip().splitlines()[-3:],
        "repro_ok": running.returncode == 0,
        "repro_stderr": repro_err.strip().splitlines()[-2:],
        "workspace_identical": running.returncode == 0 and not differences(repo, "train", ref_lock, ref_files),
        "experiment_tau": exp.get("tau"),
        "experiment_has_metrics": bool(exp.get("metrics")),
        "stray_temps": stray_temps(repo),
    }
    result["ok"] = (
        result["queued"]
        and result["queue_started"]
        and result["workspace_identical"]
        and result["experiment_tau"] == 0.05
        and result["experiment_has_metrics"]
        and not result["stray_temps"]
    )
    dvc(repo, "exp", "remove", name)
    return result


def _experiment(shown: str, name: str) -> dict:
    """The experiment `name` in `dvc exp show --json`'s output: its tau and whether it has metrics."""
    try:
        rows = json.loads(shown)
    except json.JSONDecodeError:
        return {}
    for row in rows:
        for exp in row.get("experiments") or []:
            if exp.get("name") != name:
                continue
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                params = data.get("params", {}).get("params.yaml", {}).get("data", {})
                return {"tau": params.get("tau"), "metrics": data.get("metrics")}
    return {}
