"""An offline page template for `dvc plots show` / `dvc plots diff` (.dvc/plots/offline.html).

DVC's default page loads vega, vega-lite and vega-embed from a CDN, so on a machine without network
the page is blank. This template inlines the versions DVC's renderer pins (dvc_render/vega.py), taken
once from the npm registry by name and version and checked against the sha256 recorded below, and
has no `{scripts}` placeholder, so DVC adds no remote script tags. Rebuild (network to
registry.npmjs.org needed once): `python -m sae_ortho.base.offline_plots`.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import urllib.request
from pathlib import Path

TEMPLATE = Path(".dvc/plots/offline.html")
# name -> (version DVC's renderer pins, sha256 of the npm tarball, file inside it); all BSD-3-Clause.
PACKAGES = {
    "vega": ("5.20.2", "d77deab01d6104b1239228720721f93003e60797d2faced7ffdd759fa70f989d", "package/build/vega.min.js"),
    "vega-lite": (
        "5.2.0",
        "f64ca4745f043447ac86b67dc9e9592ec2b85ac8b8dafc35faf970f142463e4b",
        "package/build/vega-lite.min.js",
    ),
    "vega-embed": (
        "6.18.2",
        "93aeee312e92077b0252ef026c0fe0ec8fa430c19825aeada6cd3a6804e68e1b",
        "package/build/vega-embed.min.js",
    ),
}

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot (offline)</title>
    <!-- {versions}: inlined from the npm registry (BSD-3-Clause), no CDN -->
{inlined}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def fetch(name: str, version: str, sha256: str, member: str) -> str:
    url = f"https://registry.npmjs.org/{name}/-/{name}-{version}.tgz"
    with urllib.request.urlopen(url, timeout=60) as response:
        blob = response.read()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != sha256:
        raise ValueError(f"{url}: sha256 {digest} != the recorded {sha256}")
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        extracted = tar.extractfile(member)
        if extracted is None:
            raise ValueError(f"{url} has no {member}")
        return extracted.read().decode("utf-8")


def build(out: Path = TEMPLATE) -> Path:
    scripts = []
    for name, (version, sha256, member) in PACKAGES.items():
        # An inline script ends at the first "</script": escape any inside the library.
        code = fetch(name, version, sha256, member).replace("</script", "<\\/script")
        scripts.append(f"    <script>/* {name}@{version} */\n{code}\n    </script>")
    versions = ", ".join(f"{n}@{v[0]}" for n, v in PACKAGES.items())
    # Only DVC's placeholders stay in braces: str.format would trip on the libraries' own braces.
    page = (
        PAGE.replace("{{", "{")
        .replace("}}", "}")
        .replace("{versions}", versions)
        .replace("{inlined}", "\n".join(scripts))
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out


if __name__ == "__main__":
    path = build()
    print(f"{path}: {path.stat().st_size / 1e6:.2f} MB")
