"""Launch training on one or more devices, the way scripts/run_train.sh is called (USAGE below).

Ascend: one process per device with DEVICE_ID / RANK_ID / RANK_SIZE / RANK_TABLE_FILE (HCCL), each in
output_path/rank_<i>/ with its own log. GPU, and CPU with DEVICE_NUM > 1: MindSpore's msrun. Every
argument is checked before anything starts; the launcher waits for every rank and, when one fails,
stops the others and exits non-zero. DRY_RUN=1 prints each rank's environment and command instead.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from src.config import ROOT, Config, load_config
from src.engine.published import is_remote
from src.errors import UserError

_OPTIONAL = "[CKPT_PATH FREEZE_LAYER [FILTER_HEAD]] [--key value ...]"
USAGE = f"""usage:
  sh scripts/run_train.sh Ascend DEVICE_NUM VISIBLE_DEVICES RANK_TABLE_FILE DATASET_PATH {_OPTIONAL}
  sh scripts/run_train.sh GPU DEVICE_NUM VISIBLE_DEVICES DATASET_PATH {_OPTIONAL}
  sh scripts/run_train.sh CPU [DEVICE_NUM] DATASET_PATH {_OPTIONAL}
VISIBLE_DEVICES: 0-7 or 0,2,4,6; FREEZE_LAYER: none|backbone; FILTER_HEAD: True|False;
DRY_RUN=1 prints each rank's environment and command and launches nothing"""
MAX_DEVICES = 8
HCCL_ENV = {"HCCL_CONNECT_TIMEOUT": "600"}  # as the ModelZoo scripts set it


class UsageError(UserError):
    """Wrong number or shape of positional arguments: the usage is printed."""


@dataclass
class Rank:
    rank: int
    env: dict[str, str]
    command: list[str]
    cwd: Path
    log: Path | None = None


@dataclass
class Plan:
    platform: str
    device_num: int
    devices: list[int]
    rank_table: Path | None
    train_args: list[str]
    output_path: Path
    ranks: list[Rank] = field(default_factory=list)
    shared_command: list[str] | None = None  # msrun starts every rank itself
    shared_env: dict[str, str] = field(default_factory=dict)


def parse_devices(text: str) -> list[int]:
    """'0-3' -> [0, 1, 2, 3]; '0,2,4' -> [0, 2, 4]; ranges and lists combine ('0-1,4')."""
    devices: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                devices += list(range(lo, hi + 1))
            else:
                devices.append(int(part))
    except ValueError:
        raise UserError(f"VISIBLE_DEVICES '{text}' is not a device list (write 0-7 or 0,2,4,6)") from None
    if len(set(devices)) != len(devices) or any(d < 0 or d >= MAX_DEVICES for d in devices):
        raise UserError(f"VISIBLE_DEVICES '{text}' must name distinct devices 0..{MAX_DEVICES - 1}")
    return devices


def check_rank_table(path: Path, device_num: int) -> None:
    if not path.is_file():
        raise UserError(f"RANK_TABLE_FILE {path} not found (generate it with hccl_tools.py on the Ascend server)")
    try:
        table = json.loads(path.read_text())
        count = sum(len(server["device"]) for server in table["server_list"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"RANK_TABLE_FILE {path} is not an HCCL rank table (JSON with server_list[].device[]; "
                        "generate it with hccl_tools.py)") from None
    if count != device_num:
        raise UserError(f"RANK_TABLE_FILE {path} lists {count} devices but DEVICE_NUM is {device_num} "
                        "(use a rank table made for this device count)")


def _device_num(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_DEVICES:
        raise UserError(f"DEVICE_NUM '{text}' must be 1..{MAX_DEVICES} per node")
    return int(text)


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            return argv[:i], argv[i:]
    return argv, []


def plan_launch(argv: list[str]) -> Plan:
    """Check every argument and work out what each rank runs."""
    positional, extra = _split(list(argv))
    if not positional:
        raise UsageError("no platform given")
    platform, rest = positional[0], positional[1:]
    if platform not in ("Ascend", "GPU", "CPU"):
        raise UsageError(f"platform '{platform}' is not one of Ascend, GPU, CPU")
    rank_table = None
    if platform in ("Ascend", "GPU"):
        need = 4 if platform == "Ascend" else 3
        if len(rest) < need:
            raise UsageError(f"{platform} needs {need} arguments before the optional ones")
        device_num = _device_num(rest[0])
        devices = parse_devices(rest[1])
        if len(devices) != device_num:
            raise UserError(f"VISIBLE_DEVICES '{rest[1]}' names {len(devices)} devices but DEVICE_NUM is {device_num}")
        if platform == "Ascend":
            rank_table = Path(rest[2]).resolve()
            check_rank_table(rank_table, device_num)
        rest = rest[need - 1:]
    else:
        device_num = _device_num(rest.pop(0)) if rest and rest[0].isdigit() else 1
        devices = list(range(device_num))
    if not rest:
        raise UsageError("DATASET_PATH is missing")
    if len(rest) not in (1, 3, 4):
        raise UsageError("CKPT_PATH needs FREEZE_LAYER after it (none or backbone)")
    dataset = Path(rest[0])
    if not dataset.exists():
        raise UserError(f"DATASET_PATH {dataset} does not exist (pass the dataset folder)")
    train_args = ["--platform", platform, "--dataset_path", str(dataset.resolve())]
    if len(rest) >= 3:
        ckpt, freeze = rest[1], rest[2]
        if not is_remote(ckpt) and not Path(ckpt).is_file():
            raise UserError(f"CKPT_PATH {ckpt} not found (pass a checkpoint file, a URL, or a short name such as "
                            "mindcv:mobilenet_v2_100)")
        if freeze not in ("none", "backbone"):
            raise UserError(f"FREEZE_LAYER '{freeze}' is not none or backbone")
        # a short name or URL is downloaded by the ranks, one at a time through the cache's lock
        train_args += ["--pretrain_ckpt", ckpt if is_remote(ckpt) else str(Path(ckpt).resolve()),
                       "--freeze_layer", freeze]
        if len(rest) == 4:
            train_args += ["--filter_head", rest[3]]
    if device_num > 1:
        train_args += ["--run_distribute", "True"]
    cfg: Config = load_config(train_args + extra)  # every flag is checked once here, not in 8 failing ranks
    output = Path(cfg.output_path).resolve()
    train_args += extra + ["--output_path", str(output)]
    plan = Plan(platform, device_num, devices, rank_table, train_args, output)
    _add_ranks(plan)
    return plan


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _add_ranks(plan: Plan) -> None:
    train = [sys.executable, str(ROOT / "train.py"), *plan.train_args]
    n = plan.device_num
    if plan.platform == "Ascend":
        for i, device in enumerate(plan.devices):
            env = {"DEVICE_ID": str(device), "RANK_ID": str(i), "RANK_SIZE": str(n),
                   "RANK_TABLE_FILE": str(plan.rank_table), **HCCL_ENV}
            folder = plan.output_path / f"rank_{i}"
            plan.ranks.append(Rank(i, env, train, folder, folder / "log.txt"))
        return
    visible = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, plan.devices))} if plan.platform == "GPU" else {}
    plan.shared_env = visible
    if n == 1:
        plan.ranks.append(Rank(0, {**visible, "RANK_ID": "0", "RANK_SIZE": "1"}, train, Path.cwd()))
        return
    log_dir = plan.output_path / "logs"
    plan.shared_command = ["msrun", f"--worker_num={n}", f"--local_worker_num={n}", f"--master_port={_free_port()}",
                           f"--log_dir={log_dir}", "--join=True", "--cluster_time_out=300",
                           str(ROOT / "train.py"), *plan.train_args]
    for i in range(n):
        plan.ranks.append(Rank(i, {**visible, "RANK_ID": str(i), "RANK_SIZE": str(n)}, plan.shared_command,
                               Path.cwd(), log_dir / f"worker_{i}.log"))


def describe(plan: Plan) -> str:
    lines = []
    for r in plan.ranks:
        env = " ".join(f"{k}={v}" for k, v in r.env.items())
        where = f" (msrun worker {r.rank})" if plan.shared_command else ""
        lines.append(f"rank {r.rank}: {env}{where}")
        if not plan.shared_command:
            log = f" > {shlex.quote(str(r.log))} 2>&1" if r.log else ""
            lines.append(f"  cd {shlex.quote(str(r.cwd))} && {shlex.join(r.command)}{log}")
    if plan.shared_command:
        env = " ".join(f"{k}={v}" for k, v in plan.shared_env.items())
        lines.append(f"command: {env + ' ' if env else ''}{shlex.join(plan.shared_command)}")
    return "\n".join(lines)


def _run_ranks(plan: Plan) -> int:
    """One process per rank; wait for all; if one fails, stop the others and report it."""
    procs = []
    for r in plan.ranks:
        r.cwd.mkdir(parents=True, exist_ok=True)
        out = open(r.log, "w") if r.log else None  # noqa: SIM115 - closed below
        procs.append((r, subprocess.Popen(r.command, cwd=r.cwd, env={**os.environ, **r.env}, stdout=out,
                                          stderr=subprocess.STDOUT if out else None, start_new_session=True), out))
        print(f"rank {r.rank}: started (pid {procs[-1][1].pid})" + (f", log {r.log}" if r.log else ""), flush=True)
    failed = None
    try:
        while procs and failed is None:
            for item in list(procs):
                r, proc, out = item
                code = proc.poll()
                if code is None:
                    continue
                procs.remove(item)
                if out:
                    out.close()
                if code != 0:
                    failed = (r, code)
                    break
            time.sleep(0.5)
    finally:
        for _, proc, out in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            if out:
                out.close()
    if failed:
        r, code = failed
        print(f"error: rank {r.rank} failed with exit code {code}; the other ranks were stopped "
              f"(see {r.log or 'the output above'})", file=sys.stderr)
        return 1
    print(f"all {plan.device_num} ranks finished; outputs in {plan.output_path}", flush=True)
    return 0


def launch(argv: list[str]) -> int:
    try:
        plan = plan_launch(argv)
    except UsageError as exc:
        print(f"error: {exc}\n{USAGE}", file=sys.stderr)
        return 2
    if os.environ.get("DRY_RUN") == "1":
        print(describe(plan))
        return 0
    if plan.shared_command:
        plan.output_path.mkdir(parents=True, exist_ok=True)
        print(describe(plan), flush=True)
        code = subprocess.run(plan.shared_command, env={**os.environ, **plan.shared_env}).returncode
        if code != 0:
            print(f"error: a rank failed (exit code {code}); msrun stopped the others (see the worker logs in "
                  f"{plan.output_path / 'logs'})", file=sys.stderr)
            return 1
        print(f"all {plan.device_num} ranks finished; outputs in {plan.output_path}", flush=True)
        return 0
    return _run_ranks(plan)


if __name__ == "__main__":
    from src.errors import run_cli

    sys.exit(run_cli(lambda argv: launch(list(argv))))
