"""Generate the findings pages from the committed findings folders (results/*/) at build time.

Each `results/<audit>/findings.md` (written by `stabilitybench export`) becomes one page, with
the report's figures beside it; the overview gathers each audit's verdict table. Nothing here
is typed by hand: re-export a folder and the pages follow.
"""

from __future__ import annotations

import json
from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"
# The order a reader meets them in (others follow alphabetically).
ORDER = [
    "paper_rl_ppo",
    "paper_rl_td3",
    "paper_rl_sac",
    "paper_rl",
    "paper_rl_guards",
    "paper_lm",
    "paper_lm_collapse",
    "paper_lm_guards",
    "paper_lm_ramp_guards",
    "paper_lm_doses",
    "paper_lm_intrinsic",
    "paper_lm_intrinsic_edge",
    "paper_lm_intrinsic_judged",
    "paper_lm_intrinsic_guards",
    "lm_buildup",
    "lm_buildup_guards",
    "quickstart_guards",
]


def _folders() -> list[Path]:
    found = {p.parent.name: p.parent for p in RESULTS.glob("*/findings.md")}
    names = [n for n in ORDER if n in found] + sorted(set(found) - set(ORDER))
    return [found[n] for n in names]


def _verdict_table(text: str) -> str:
    """The first table of a findings.md: one row per workload, one verdict per claim."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join(lines[start:end])


def _version(folder: Path) -> str:
    path = folder / "version.json"
    if not path.exists():
        return "see version.json"
    info = json.loads(path.read_text())
    package = info.get("versions", {}).get("stabilitybench", "?")
    runs = ", ".join(f"{n} {status}" for status, n in info.get("runs", {}).items())
    return (
        f"stabilitybench {package}, {runs} runs, exported {str(info.get('exported_at', '?'))[:10]}"
    )


def _page(folder: Path) -> None:
    name = folder.name
    text = (folder / "findings.md").read_text()
    body = text.split("\n", 1)[1] if text.startswith("## Findings") else text
    body = body.replace("\n### ", "\n## ")
    spec = f"results/{name}/spec.yaml"
    lines = [
        f"# {name}",
        "",
        f"From `results/{name}/findings.md`, which `stabilitybench export` wrote "
        f"({_version(folder)}); the audit's spec is `{spec}`, and "
        f"`stabilitybench findings results/{name}` prints the same tables.",
        "",
        body.strip(),
    ]
    figures = sorted((folder / "figures").glob("*.png"))
    if figures:
        lines += ["", "## Figures", "", f"The report's figures (`results/{name}/figures/`).", ""]
        for figure in figures:
            target = f"findings/{name}/{figure.name}"
            with mkdocs_gen_files.open(target, "wb") as out:
                out.write(figure.read_bytes())
            lines += [f"![{figure.stem}]({name}/{figure.name})", ""]
    with mkdocs_gen_files.open(f"findings/{name}.md", "w") as page:
        page.write("\n".join(lines) + "\n")


def _overview(folders: list[Path]) -> None:
    lines = [
        "# The verdicts at a glance",
        "",
        "Each committed findings folder's verdict table, read from `results/<audit>/findings.md` "
        "at build time. The rules behind *supported*, *not supported* and *inconclusive* are "
        "on [Reading the findings](index.md#the-verdict-rules) and under every table.",
    ]
    for folder in folders:
        text = (folder / "findings.md").read_text()
        lines += ["", f"## [{folder.name}]({folder.name}.md)", "", _verdict_table(text)]
    with mkdocs_gen_files.open("findings/verdicts.md", "w") as page:
        page.write("\n".join(lines) + "\n")


def main() -> None:
    folders = _folders()
    for folder in folders:
        _page(folder)
    _overview(folders)


main()
