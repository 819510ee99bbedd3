"""Write docs/config.md from the Config metadata in src/config.py: one table per section, in field order.

    python tools/make_config_docs.py           # (re)write docs/config.md
    python tools/make_config_docs.py --check   # exit 1 if docs/config.md differs from what this would write

Reads src/config.py only (its FIELDS, ALIASES, TOOL_FLAGS and TOOL_DEFAULTS), which loads no MindSpore.
tests/test_docs.py fails when docs/config.md is stale.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.config import (  # noqa: E402
    ALIASES,
    DEFAULT_CONFIG,
    FALSE_WORDS,
    FIELDS,
    TOOL_DEFAULTS,
    TOOL_FLAGS,
    TRUE_WORDS,
)

OUTPUT = ROOT / "docs" / "config.md"
COMMAND = "python tools/make_config_docs.py"
STALE = f"docs/config.md is stale (run {COMMAND})"
# the pages that explain a section's keys beyond their one-line help (a section not named here gets no line)
SEE_ALSO = {
    "model and data": "[models.md](models.md) (the nets), [data.md](data.md) (data sets), "
                      "[finetune.md](finetune.md) (`bn_eps` and `padding` of published weights)",
    "device and run": "[distributed.md](distributed.md), [failures.md](failures.md) (outputs, logs, dataset sink "
                      "mode)",
    "data pipeline and augmentation": "[data.md](data.md) (transforms), [recipes.md](recipes.md) (augmentation, "
                                      "random erasing, mixup and cutmix)",
    "optimisation": "[recipes.md](recipes.md) (LR schedules, EMA, clipping, gradient accumulation)",
    "mixed precision and quantization": "[recipes.md](recipes.md) (mixed precision, loss scaling, PACT QAT)",
    "checkpoints, evaluation and fine-tuning": "[finetune.md](finetune.md), [failures.md](failures.md) (resume)",
    "ModelArts / OBS": "[distributed.md](distributed.md#modelarts-and-obs)",
    "export and deployment": "[export.md](export.md)",
}


def _cell(text: str) -> str:
    """Code for a markdown table cell (a `|` would end the cell)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _text(text: str) -> str:
    """Prose for a markdown table cell (`<model>` would be read as an HTML tag)."""
    return _cell(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _code(text: str) -> str:
    return f"`{_cell(text)}`"


def _flags(name: str) -> list[str]:
    return [f"--{name}"] + [f"--{alias}" for alias in ALIASES.get(name, ())]


def _key(name: str) -> str:
    aliases = ", ".join(_code(flag) for flag in _flags(name)[1:])
    return f"{_code(name)} ({aliases})" if aliases else _code(name)


def _default(value) -> str:
    return '`""`' if value == "" else _code(repr(value) if isinstance(value, float) else value)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


def _allowed(f) -> str:
    meta = f.metadata
    base = str(f.type).split("|")[0].strip()
    if meta["choices"]:
        text = ", ".join(_code(c) for c in meta["choices"])
    elif meta["min"] is not None and meta["max"] is not None:
        text = f"{_number(meta['min'])}..{_number(meta['max'])}"
    elif meta["min"] is not None:
        text = f">= {_number(meta['min'])}"
    elif meta["max"] is not None:
        text = f"<= {_number(meta['max'])}"
    elif base == "bool":
        text = "`True`, `False`"
    else:
        text = "any"
    return f"{text}, or `None`" if meta["nullable"] else text


def _sections() -> dict[str, list]:
    sections: dict[str, list] = {}
    for f in FIELDS.values():
        sections.setdefault(f.metadata["section"], []).append(f)
    return sections


def _tool(name: str) -> str:
    return f"`{name}.py`"


def render() -> str:
    """The text of docs/config.md."""
    default_yaml = DEFAULT_CONFIG.relative_to(ROOT).as_posix()
    lines = [
        "# Configuration keys",
        "",
        f"Generated from `src/config.py` by `{COMMAND}`: do not edit it by hand. After changing a key, run that "
        f"command (`{COMMAND} --check` exits 1 when this page is stale; `tests/test_docs.py` checks it too).",
        "",
        "## YAML and flags",
        "",
        "- Every key below is a YAML key and a `--key value` flag of every tool (train.py, eval.py, export.py, "
        "eval_onnx.py, predict.py, benchmark.py).",
        f"- `--config_path FILE` picks the YAML (default `{default_yaml}`; the files are listed in the "
        "[README](../README.md#configs)). The YAML only sets defaults; a tool's own defaults (below) override it; "
        "flags override both.",
        "- The resolved config is saved as `output_path/config.yaml`, which is itself a valid `--config_path`.",
        "- Unknown keys or flags, wrong types, out-of-range values and bad choices stop the run with the valid "
        "options named. Numbers must be finite (`--lr_max nan` is refused); a YAML key given twice is refused.",
        f"- Booleans accept only {'/'.join(TRUE_WORDS + FALSE_WORDS)}; a boolean flag alone means True "
        "(`--pact_quant`).",
        "- The spellings of the PaddleClas/torchvision/ModelZoo seeds (in brackets after a key) work on every tool "
        "and mean that key.",
        "- `python train.py --help` lists the keys in these sections, with the values the chosen YAML gives them.",
        "",
    ]
    for title, fields in _sections().items():
        lines += [f"## {title[0].upper()}{title[1:]}", ""]
        if title in SEE_ALSO:
            lines += [f"More in {SEE_ALSO[title]}.", ""]
        lines += ["| key | type | default | allowed | what it does |", "|---|---|---|---|---|"]
        for f in fields:
            lines.append(f"| {_key(f.name)} | {_code(f.type)} | {_default(f.default)} | {_allowed(f)} | "
                         f"{_text(f.metadata['help'])} |")
        lines.append("")
    lines += [
        "## Flags per tool",
        "",
        "On these tools one key names the input file, and the flags of the other spelling set it too (the other key "
        "keeps its YAML value and is not a flag there). The tools not listed route no flags.",
        "",
        "| tool | reads | set by the flags |",
        "|---|---|---|",
    ]
    for tool, routes in TOOL_FLAGS.items():
        targets: dict[str, list[str]] = {}
        for key, target in routes.items():
            targets.setdefault(target, _flags(target)).extend(_flags(key))
        for target, flags in targets.items():
            lines.append(f"| {_tool(tool)} | {_code(target)} | {', '.join(_code(flag) for flag in flags)} |")
    lines += [
        "",
        "## Tool defaults",
        "",
        "Values a tool uses over the YAML's, unless the command line gives the key.",
        "",
        "| tool | key | value |",
        "|---|---|---|",
    ]
    for tool, values in TOOL_DEFAULTS.items():
        for key, value in values.items():
            lines.append(f"| {_tool(tool)} | {_code(key)} | {_default(value)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/config.md is stale; write nothing")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.is_file() else None
        if current != text:
            print(STALE, file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUTPUT.with_name(f".tmp-{OUTPUT.name}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(OUTPUT)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
