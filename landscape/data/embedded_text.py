"""The embedded default corpus and the labelled sentiment set, extracted on first use.

The text is third-party material and is NOT committed: this script fetches it with pip from
two public Python packages and extracts it, with the standard library only.

* ``gensim==4.4.0`` (wheel, never installed, read as a zip):
    - ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
      a shortened English Wikipedia dump (MediaWiki XML), stripped here to plain prose;
    - ``gensim/test/test_data/lee_background.cor``: the Lee background corpus, 300 news articles.
  -> ``<data home>/corpus/train.jsonl`` and ``<data home>/corpus/heldout.jsonl`` (seeded article-level split),
     one ``{"text", "source", "id"}`` object per line.
* ``vaderSentiment==3.3.2`` (sdist): ``additional_resources/hutto_ICWSM_2014.tar.gz`` ->
  ``hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt``
  -> ``<data home>/sentiment/movie_snippets.tsv`` (``text<TAB>label<TAB>rating``, label = rating > 0,
     rating == 0 rows skipped). Unquoted TSV: read it with ``csv`` ``quoting=csv.QUOTE_NONE``.

The data home is ``LANDSCAPE_DATA`` or ``~/.cache/landscape`` (``landscape.datahome``).  Stages
call ``ensure_embedded_text()`` when they need the text; ``python data/build_corpus.py`` does it
ahead of time (``--archives DIR`` for machines without network: the wheel and sdist from DIR).
When the archives cannot be had, ``UsageError`` says in one line how to provide them.
"""
from __future__ import annotations

import argparse
import bz2
import glob
import html
import io
import math
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

from ..datahome import data_home
from ..errors import UsageError
from ..files import json_text

GENSIM_SPEC = "gensim==4.4.0"
VADER_SPEC = "vaderSentiment==3.3.2"
WIKI_MEMBER = ("gensim/test/test_data/"
               "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
GENSIM_PLATFORM = "manylinux_2_28_x86_64"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
SNIPPETS_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"

HELDOUT_FRACTION = 0.05
MAX_DOC_WORDS = 2000
MIN_PARAGRAPH_WORDS = 8
# Sections after which a Wikipedia article is only lists and references.
TAIL_SECTIONS = {"see also", "references", "external links", "notes", "further reading",
                 "bibliography", "sources", "footnotes", "citations", "notes and references",
                 "external link", "reference", "works cited"}
DROP_LINK_PREFIX = re.compile(r"^\s*:?\s*(file|image|category|media|wikipedia|wp|template|help|"
                              r"portal|user|talk|special|wiktionary|wikt|commons|s|q|n|b|v|"
                              r"[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)


# The wheel has no data/ scripts: the hint names what an installed package can run.
ARCHIVES_HINT = (f"without network, download {GENSIM_SPEC} (wheel) and {VADER_SPEC} (sdist) elsewhere into a "
                 "folder DIR and set LANDSCAPE_ARCHIVES=DIR (or run `python -m landscape.data.embedded_text "
                 "--archives DIR`)")


def fail(msg: str) -> None:
    """Raise the one-line UsageError of a failed extraction, saying ``msg``."""
    raise UsageError(f"the embedded corpus could not be extracted: {msg}; {ARCHIVES_HINT}")


# ----------------------------------------------------------------------------- fetching
def pip_download(spec: str, dest: str, sdist: bool) -> None:
    """Download the archive of ``spec`` (no dependencies) into ``dest`` with pip.

    Args:
        spec: a pip requirement, e.g. 'gensim==4.4.0'.
        dest: the folder to download into.
        sdist: get the source archive; otherwise the one fixed wheel, whatever the host.

    Raises:
        UsageError: pip failed (its last line is quoted).
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", dest]
    if sdist:
        cmd += ["--no-binary", ":all:"]
    else:  # the same wheel file whatever the host's Python and platform
        cmd += ["--only-binary", ":all:", "--platform", GENSIM_PLATFORM,
                "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]
    cmd.append(spec)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
        fail(f"'pip download {spec}' failed (exit {proc.returncode}): {last}")


def find_archive(directory: str, pattern: str) -> str | None:
    """The first file of ``directory`` matching the glob ``pattern`` (sorted by name), or None."""
    hits = sorted(glob.glob(os.path.join(directory, pattern)))
    return hits[0] if hits else None


def get_archives(archives_dir: str | None, tmp: str) -> tuple[str, str]:
    """Find (in ``archives_dir``) or download (into ``tmp``) the gensim wheel and vaderSentiment sdist.

    Returns:
        (wheel path, sdist path).

    Raises:
        UsageError: they can be neither found nor downloaded.
    """
    wheel_pat, sdist_pat = "gensim-4.4.0-*.whl", "vaderSentiment-3.3.2.tar.gz"
    wheel = find_archive(archives_dir, wheel_pat) if archives_dir else None
    sdist = find_archive(archives_dir, sdist_pat) if archives_dir else None
    if wheel is None:
        pip_download(GENSIM_SPEC, tmp, sdist=False)
        wheel = find_archive(tmp, wheel_pat)
    if sdist is None:
        pip_download(VADER_SPEC, tmp, sdist=True)
        sdist = find_archive(tmp, sdist_pat)
    if wheel is None or sdist is None:
        fail("pip download succeeded but the expected gensim wheel / vaderSentiment sdist is missing")
    return wheel, sdist


# ----------------------------------------------------------------------------- wiki cleaning
_RE_COMMENT = re.compile(r"<!--.*?-->", re.S)
_RE_REF_SELF = re.compile(r"<ref[^>]*/\s*>", re.I)
_RE_REF = re.compile(r"<ref[^>]*>.*?</ref\s*>", re.I | re.S)
_RE_DROP_TAGS = re.compile(r"<(math|gallery|timeline|source|syntaxhighlight|pre|code|score|"
                           r"imagemap|chem|hiero|references)[^>]*>.*?</\1\s*>", re.I | re.S)
_RE_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_RE_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.S)
_RE_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_RE_EXTLINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_RE_BARE_URL = re.compile(r"https?://\S+")
_RE_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_RE_QUOTES = re.compile(r"'{2,}")
_RE_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_RE_MAGIC = re.compile(r"__[A-Z]+__")
_RE_SPACES = re.compile(r"[ \t\u00a0]+")
_RE_EMPTY_PARENS = re.compile(r"\(\s*[,;]*\s*\)")


def _repeat(pattern: re.Pattern, repl, text: str) -> str:
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _link(m: re.Match) -> str:
    inner = m.group(1)
    if DROP_LINK_PREFIX.match(inner):
        return ""
    return inner.split("|")[-1] if "|" in inner else inner


def wiki_to_paragraphs(markup: str) -> list[str]:
    """Plain-prose paragraphs of one article's wikitext."""
    t = _RE_COMMENT.sub("", markup)
    t = _RE_REF_SELF.sub("", t)
    t = _RE_REF.sub("", t)
    t = _RE_DROP_TAGS.sub("", t)
    t = _repeat(_RE_TEMPLATE, "", t)          # innermost first, so nesting is handled
    t = _repeat(_RE_TABLE, "", t)
    t = _repeat(_RE_LINK, _link, t)           # inner links resolved before File: captions drop
    t = _RE_EXTLINK.sub(lambda m: m.group(1), t)
    t = _RE_BARE_URL.sub("", t)
    t = html.unescape(t)
    t = _RE_TAG.sub("", t)
    t = _RE_QUOTES.sub("", t)
    t = _RE_MAGIC.sub("", t)

    paragraphs: list[str] = []
    for raw in t.split("\n"):
        line = raw.strip()
        h = _RE_HEADING.match(line)
        if h:
            if h.group(2).strip().lower() in TAIL_SECTIONS:
                break
            continue
        if not line or line[0] in "|!{}" or line.startswith("[[") or line.startswith("]]"):
            continue
        line = line.lstrip("*#:; ").strip()
        line = _RE_EMPTY_PARENS.sub("", line)
        line = _RE_SPACES.sub(" ", line).replace(" ,", ",").replace(" .", ".").strip()
        if "{{" in line or "}}" in line or "[[" in line or "]]" in line:
            continue                          # unbalanced leftovers
        if len(line.split()) < MIN_PARAGRAPH_WORDS:
            continue
        paragraphs.append(line)
    return paragraphs


def chunk_paragraphs(paragraphs: list[str], max_words: int = MAX_DOC_WORDS) -> list[str]:
    """Group consecutive paragraphs into documents of at most ~max_words words."""
    docs, cur, n = [], [], 0
    for p in paragraphs:
        w = len(p.split())
        if cur and n + w > max_words:
            docs.append("\n".join(cur))
            cur, n = [], 0
        cur.append(p)
        n += w
    if cur:
        docs.append("\n".join(cur))
    return docs


def read_wiki(raw_bz2: bytes) -> list[tuple[str, list[str]]]:
    """[(page id, paragraphs)] for the main-namespace, non-redirect pages."""
    data = bz2.decompress(raw_bz2)
    out = []
    for _, elem in ET.iterparse(io.BytesIO(data), events=("end",)):
        if not elem.tag.endswith("}page"):
            continue
        ns_uri = elem.tag[: -len("page")]
        ns = elem.findtext(f"{ns_uri}ns")
        pid = elem.findtext(f"{ns_uri}id")
        redirect = elem.find(f"{ns_uri}redirect") is not None
        text = elem.findtext(f"{ns_uri}revision/{ns_uri}text") or ""
        elem.clear()
        if ns != "0" or redirect or text.lstrip().upper().startswith("#REDIRECT"):
            continue
        paras = wiki_to_paragraphs(text)
        if paras:
            out.append((pid, paras))
    return out


# ----------------------------------------------------------------------------- main steps
def build_corpus(wheel: str, out_dir: str, seed: int) -> str:
    """Build the embedded text corpus from the gensim wheel's test texts.

    Args:
        wheel: the gensim wheel.
        out_dir: the folder to write the corpus into.
        seed: seeds the split (an article's chunks always stay in the same split).

    Returns:
        The path written.
    """
    with zipfile.ZipFile(wheel) as z:
        wiki_raw = z.read(WIKI_MEMBER)
        lee_raw = z.read(LEE_MEMBER).decode("utf-8", errors="replace")

    # groups: one per source article; an article's chunks always stay in the same split
    groups: list[tuple[str, list[dict]]] = []
    for pid, paras in read_wiki(wiki_raw):
        docs = [{"text": d, "source": "enwiki", "id": f"enwiki-{pid}-{k}"}
                for k, d in enumerate(chunk_paragraphs(paras))]
        groups.append(("enwiki", docs))
    for i, line in enumerate(lee_raw.splitlines()):
        line = _RE_SPACES.sub(" ", line).strip()
        if len(line.split()) >= MIN_PARAGRAPH_WORDS:
            groups.append(("lee", [{"text": line, "source": "lee", "id": f"lee-{i}"}]))

    # seeded split, stratified by source: 5% of each source's articles held out
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"train": [], "heldout": []}
    for source in ("enwiki", "lee"):
        idx = [i for i, (s, _) in enumerate(groups) if s == source]
        rng.shuffle(idx)
        n_held = max(1, int(math.ceil(HELDOUT_FRACTION * len(idx))))
        held = set(idx[:n_held])
        for i in sorted(idx):
            splits["heldout" if i in held else "train"].extend(groups[i][1])

    os.makedirs(out_dir, exist_ok=True)
    parts = []
    for name, docs in splits.items():
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json_text(d, ensure_ascii=False) + "\n")
        words = {s: sum(len(d["text"].split()) for d in docs if d["source"] == s)
                 for s in ("enwiki", "lee")}
        parts.append(f"{name}: {len(docs)} docs, {sum(words.values())} words "
                     f"(enwiki {words['enwiki']}, lee {words['lee']})")
    return "; ".join(parts)


def build_sentiment(sdist: str, out_dir: str) -> str:
    """Build the embedded sentiment data set from the vaderSentiment sdist's rated snippets.

    Args:
        sdist: the vaderSentiment source archive.
        out_dir: the folder to write the data set into.

    Returns:
        The path written.
    """
    with tarfile.open(sdist, "r:gz") as outer:
        inner_bytes = outer.extractfile(VADER_INNER).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        raw = inner.extractfile(SNIPPETS_MEMBER).read().decode("utf-8")
    rows, skipped, bad = [], 0, 0
    for line in raw.splitlines():
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 3:
            bad += 1
            continue
        try:
            rating = float(parts[1])
        except ValueError:
            bad += 1
            continue
        text = _RE_SPACES.sub(" ", " ".join(parts[2:])).strip()
        if rating == 0:
            skipped += 1
            continue
        rows.append((text, 1 if rating > 0 else 0, parts[1].strip()))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "movie_snippets.tsv"), "w", encoding="utf-8", newline="\n") as f:
        f.write("text\tlabel\trating\n")
        for text, label, rating in rows:
            f.write(f"{text}\t{label}\t{rating}\n")
    pos = sum(r[1] for r in rows)
    return (f"sentiment: {len(rows)} snippets ({pos} positive, {len(rows) - pos} negative), "
            f"{skipped} with rating 0 skipped" + (f", {bad} malformed skipped" if bad else ""))


def text_outputs(home: Path) -> dict:
    """Where the embedded texts live under a data home."""
    return {"train": home / "corpus" / "train.jsonl", "heldout": home / "corpus" / "heldout.jsonl",
            "sentiment": home / "sentiment" / "movie_snippets.tsv"}


def ensure_embedded_text(home: Path, archives: "str | None" = None, force: bool = False,
                         seed: int = 0) -> dict:
    """Extract the embedded corpus and sentiment set into ``home`` unless they are there already.

    Returns ``text_outputs(home)``.  Prints one progress line while fetching (a first use takes
    about a minute: two package downloads and a Wikipedia clean-up).
    """
    outputs = text_outputs(Path(home))
    if not force and all(p.exists() for p in outputs.values()):
        return outputs
    print(f"landscape: extracting the embedded corpus into {home} (first use; about a minute)",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="landscape-corpus-") as tmp:
        wheel, sdist = get_archives(archives or os.environ.get("LANDSCAPE_ARCHIVES"), tmp)
        summary = build_corpus(wheel, str(outputs["train"].parent), seed)
        sent = build_sentiment(sdist, str(outputs["sentiment"].parent))
    print(f"landscape: {summary}; {sent}", file=sys.stderr, flush=True)
    return outputs


def embedded_text(which: str) -> Path:
    """Path of an embedded text ('train', 'heldout' or 'sentiment') in the data home, extracted on first use."""
    return ensure_embedded_text(data_home())[which]


def main(argv=None) -> int:
    """``python data/build_corpus.py``: extract the texts ahead of time (exit 2 on failure)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="data home (default: LANDSCAPE_DATA or ~/.cache/landscape)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the outputs exist")
    ap.add_argument("--archives", default=None,
                    help="folder that already holds the gensim wheel / vaderSentiment sdist")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    home = Path(args.out) if args.out else data_home()
    try:
        outputs = ensure_embedded_text(home, args.archives, args.force, args.seed)
    except UsageError as err:
        print(f"build_corpus: error: {err}", file=sys.stderr)
        return 2
    print(f"build_corpus: the embedded texts are under {outputs['train'].parent.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
