"""Launch training on one or more devices of one or more servers, as scripts/run_train.sh is called (USAGE below).

Ascend: one process per device with DEVICE_ID / RANK_ID / RANK_SIZE / RANK_TABLE_FILE (HCCL), each in
output_path/rank_<i>/ with its own log; with several servers in the rank table, this server's entry gives the
devices' ranks. GPU, and CPU with several workers: MindSpore's msrun, across nodes with NODE_NUM / NODE_RANK /
MASTER_ADDR / MASTER_PORT (every node runs the same command). Every argument is checked before anything starts;
the launcher waits for every rank and, when one fails, stops the others and exits non-zero, or, with MAX_RESTARTS=N,
starts the job again from the run's newest checkpoint when the failure was a signal or a crash (not a user error:
exit 2). DRY_RUN=1 prints each rank's environment and command instead.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from src.config import ROOT, Config, load_config
from src.engine import sinking
from src.engine.published import is_remote
from src.errors import UserError
from src.files import periodic_checkpoints
from src.lifeline import LAUNCHER_ENV

_OPTIONAL = "[CKPT_PATH FREEZE_LAYER [FILTER_HEAD]] [--key value ...]"
USAGE = f"""usage:
  sh scripts/run_train.sh Ascend DEVICE_NUM VISIBLE_DEVICES RANK_TABLE_FILE DATASET_PATH {_OPTIONAL}
  sh scripts/run_train.sh GPU DEVICE_NUM VISIBLE_DEVICES DATASET_PATH {_OPTIONAL}
  sh scripts/run_train.sh CPU [DEVICE_NUM] DATASET_PATH {_OPTIONAL}
VISIBLE_DEVICES: 0-7 or 0,2,4,6; FREEZE_LAYER: none|backbone; FILTER_HEAD: True|False;
several nodes (GPU, CPU): NODE_NUM=2 NODE_RANK=0|1 MASTER_ADDR=<node 0's address> [MASTER_PORT=8118]
[CLUSTER_TIMEOUT=300] on every node; several Ascend servers: a rank table listing them all [SERVER_ID=...];
MAX_RESTARTS=N starts the job again (with --resume_ckpt auto) when a rank is killed or crashes, up to N times
(one server; exit 2 and Ctrl-C are not restarted);
DRY_RUN=1 prints each rank's environment and command and launches nothing"""
MAX_DEVICES = 8
DEFAULT_MASTER_PORT = 8118
# seconds; on Ascend it is HCCL_CONNECT_TIMEOUT, 600 as the ModelZoo's scripts set it
DEFAULT_CLUSTER_TIMEOUT = {"Ascend": 600, "GPU": 300, "CPU": 300}


class UsageError(UserError):
    """Wrong number or shape of positional arguments: the usage is printed."""


@dataclass
class Rank:
    rank: int
    env: dict[str, str]
    command: list[str]
    cwd: Path
    log: Path | None = None


@dataclass(frozen=True)
class Nodes:
    """Where this node sits in a job of several (the NODE_* / MASTER_* / CLUSTER_TIMEOUT environment)."""
    num: int = 1
    rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None  # None on one node: a free port is picked, so two jobs can share a machine
    timeout: int = 300


@dataclass(frozen=True)
class TableServer:
    server_id: str
    devices: tuple[tuple[int, int], ...]  # (device_id, rank_id) in the table's order


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
    nodes: Nodes = field(default_factory=Nodes)
    world_size: int = 0
    note: str | None = None  # said once before the ranks start
    training: str = ""  # what Model.train gets for data sinking (the dry run prints it)
    model: str = ""
    failure: int | None = None  # the exit code of the rank that failed (negative: the signal that killed it)


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


def _table_int(value) -> int:
    """A rank table's device_id/rank_id: a decimal string or integer (hccl_tools.py writes strings)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not re.fullmatch(r"[0-9]+", str(value)):
        raise ValueError(value)
    return int(value)


def read_rank_table(path: Path) -> list[TableServer]:
    """The servers of an HCCL rank table, checked: every rank 0..N-1 once, no device twice on a server, the same
    device count on every server."""
    if path.is_dir():
        raise UserError(f"RANK_TABLE_FILE {path} is a folder (pass the JSON file hccl_tools.py wrote)")
    if not path.is_file():
        raise UserError(f"RANK_TABLE_FILE {path} not found (generate it with hccl_tools.py on the Ascend server)")
    try:
        table = json.loads(path.read_text())
        servers = []
        for server in table["server_list"]:
            if not isinstance(server["server_id"], str) or not server["server_id"].strip():
                raise ValueError("server_id")
            servers.append(TableServer(server["server_id"].strip(), tuple(
                (_table_int(d["device_id"]), _table_int(d["rank_id"])) for d in server["device"])))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"RANK_TABLE_FILE {path} is not an HCCL rank table (JSON with server_list[].server_id and "
                        "device[].device_id/rank_id; generate it with hccl_tools.py)") from None
    if not servers or not all(server.devices for server in servers):
        raise UserError(f"RANK_TABLE_FILE {path} lists no devices for {'a server' if servers else 'any server'} "
                        "(generate it with hccl_tools.py)")
    ranks = sorted(rank for server in servers for _, rank in server.devices)
    if ranks != list(range(len(ranks))):
        raise UserError(f"RANK_TABLE_FILE {path} has rank_ids {_short(ranks)} across its servers, not "
                        f"0..{len(ranks) - 1} each once (regenerate the table, or merge the servers' tables with "
                        "consecutive ranks)")
    for server in servers:
        ids = [device for device, _ in server.devices]
        if len(set(ids)) != len(ids):
            raise UserError(f"RANK_TABLE_FILE {path} lists a device_id twice for server {server.server_id} "
                            "(regenerate the table)")
    if len({server.server_id for server in servers}) != len(servers):
        raise UserError(f"RANK_TABLE_FILE {path} lists a server_id twice (each server once, with its own address)")
    counts = {server.server_id: len(server.devices) for server in servers}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{n} on {sid}" for sid, n in counts.items())
        raise UserError(f"RANK_TABLE_FILE {path} lists {listed} (every server of a job runs DEVICE_NUM devices; "
                        "regenerate the servers' tables with the same device count)")
    return servers


def _short(values: list[int]) -> str:
    return str(values) if len(values) <= 10 else f"[{', '.join(map(str, values[:8]))}, ... {values[-1]}]"


def _devices(n: int) -> str:
    return f"{n} device{'s' if n != 1 else ''}"


def _ip_addresses(address: str) -> list[str]:
    """The IP addresses `address` (an IP, [IPv6] or a host name) stands for; [] when it resolves to none."""
    try:
        infos = socket.getaddrinfo(address.strip("[]"), None, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError, ValueError):
        return []
    return list(dict.fromkeys(info[4][0] for info in infos))


def is_local_address(address: str) -> bool:
    """True when `address` (an IP or a host name) is one of this machine's: only those can be bound."""
    for ip in _ip_addresses(address):
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.bind((ip, 0))
            return True
        except OSError:
            continue
    return False


def this_server(servers: list[TableServer], path: Path, env: dict[str, str]) -> int:
    """Index of this machine's entry: SERVER_ID (its server_id or its index), else NODE_RANK (its index), else the
    entry with a local address."""
    given = env.get("SERVER_ID", "").strip()
    node_rank = env.get("NODE_RANK", "").strip()
    names = ", ".join(server.server_id for server in servers)
    index = None
    if given:
        index = next((i for i, server in enumerate(servers) if given == server.server_id), None)
        if index is None and re.fullmatch(r"[0-9]+", given) and int(given) < len(servers):
            index = int(given)
        if index is None:
            raise UserError(f"SERVER_ID '{given}' is neither a server_id of RANK_TABLE_FILE {path} ({names}) nor an "
                            f"index 0..{len(servers) - 1} (export SERVER_ID=<this server's server_id>)")
    if node_rank:
        if not re.fullmatch(r"[0-9]+", node_rank) or int(node_rank) >= len(servers):
            raise UserError(f"NODE_RANK '{node_rank}' is out of range for the {len(servers)} servers of "
                            f"RANK_TABLE_FILE {path} (use 0..{len(servers) - 1}, or unset it)")
        if index is not None and index != int(node_rank):
            raise UserError(f"NODE_RANK {node_rank} but SERVER_ID '{given}' is server {index} of RANK_TABLE_FILE "
                            f"{path} (set one of them, or both to the same server)")
        return int(node_rank)
    if index is not None:
        return index
    if len(servers) == 1:
        return 0
    local = [i for i, server in enumerate(servers) if is_local_address(server.server_id)]
    if len(local) != 1:
        what = "none is" if not local else f"{len(local)} are"
        raise UserError(f"RANK_TABLE_FILE {path} lists servers {names} and {what} an address of this machine "
                        "(export SERVER_ID=<this server's server_id> on each server)")
    return local[0]


def _int_env(env: dict[str, str], name: str, default: int, lo: int, hi: int, hint: str) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    if not re.fullmatch(r"[0-9]+", text) or not lo <= int(text) <= hi:
        raise UserError(f"{name} '{text}' must be {lo}..{hi} ({hint})")
    return int(text)


MAX_NODES = 4096
# MS_TOPO_TIMEOUT is parsed as a C int; HCCL_CONNECT_TIMEOUT takes 120..7200 s
TIMEOUT_RANGE = {"Ascend": (120, 7200), "GPU": (1, 86400), "CPU": (1, 86400)}


def read_nodes(env: dict[str, str], platform: str) -> Nodes:
    """NODE_NUM, NODE_RANK, MASTER_ADDR, MASTER_PORT and CLUSTER_TIMEOUT, checked (Ascend: the rank table says
    which servers there are; NODE_RANK is checked against it)."""
    num = _int_env(env, "NODE_NUM", 1, 1, MAX_NODES, "the number of servers in the job")
    lo, hi = TIMEOUT_RANGE[platform]
    timeout = _int_env(env, "CLUSTER_TIMEOUT", DEFAULT_CLUSTER_TIMEOUT[platform], lo, hi,
                       "seconds to wait for every node" + (", as HCCL_CONNECT_TIMEOUT" if platform == "Ascend" else ""))
    if platform == "Ascend":
        return Nodes(num, 0, timeout=timeout)
    rank = _int_env(env, "NODE_RANK", 0, 0, MAX_NODES, "this server's index")
    if rank >= num:
        raise UserError(f"NODE_RANK {rank} is out of range for NODE_NUM {num} (use 0..{num - 1}: 0 on the server at "
                        "MASTER_ADDR, a different one on each other server)")
    port_given = bool(env.get("MASTER_PORT", "").strip())
    port = _int_env(env, "MASTER_PORT", DEFAULT_MASTER_PORT, 1024, 65535, "a free TCP port on node 0")
    addr = env.get("MASTER_ADDR", "").strip() or None
    if num == 1:
        return Nodes(num, rank, addr, port if port_given else None, timeout)
    if addr is None:
        raise UserError(f"MASTER_ADDR is not set but NODE_NUM is {num} (export MASTER_ADDR=<node 0's IP address> "
                        "on every node)")
    if not _ip_addresses(addr):
        raise UserError(f"MASTER_ADDR '{addr}' is not an IP address or a known host name (export MASTER_ADDR=<node "
                        "0's IP address>)")
    if rank == 0 and not is_local_address(addr):
        raise UserError(f"NODE_RANK is 0 but MASTER_ADDR {addr} is not an address of this machine (node 0 runs the "
                        "scheduler at MASTER_ADDR: run NODE_RANK=0 on that server, 1.. on the others)")
    return Nodes(num, rank, addr, port, timeout)


def _device_num(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_DEVICES:
        raise UserError(f"DEVICE_NUM '{text}' must be 1..{MAX_DEVICES} per node")
    return int(text)


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            return argv[:i], argv[i:]
    return argv, []


def _table_devices(servers: list[TableServer], index: int, path: Path, device_num: int,
                   devices: list[int]) -> tuple[int, ...]:
    """This server's ranks, in VISIBLE_DEVICES order, after checking the table agrees with the command line."""
    server = servers[index]
    where = f" for server {server.server_id}" if len(servers) > 1 else ""
    if len(server.devices) != device_num:
        raise UserError(f"RANK_TABLE_FILE {path} lists {_devices(len(server.devices))}{where} but DEVICE_NUM is "
                        f"{device_num} (use a rank table made for this device count)")
    ranks = dict(server.devices)
    if set(ranks) != set(devices):
        raise UserError(f"RANK_TABLE_FILE {path} lists devices {sorted(ranks)}{where} but VISIBLE_DEVICES names "
                        f"{devices} (pass the table's devices, or regenerate it with hccl_tools.py "
                        "--visible_devices)")
    return tuple(ranks[d] for d in devices)


def plan_launch(argv: list[str], env: dict[str, str] | None = None) -> Plan:
    """Check every argument and work out what each rank of this node runs."""
    env = dict(os.environ) if env is None else env
    positional, extra = _split(list(argv))
    if not positional:
        raise UsageError("no platform given")
    platform, rest = positional[0], positional[1:]
    if platform not in ("Ascend", "GPU", "CPU"):
        raise UsageError(f"platform '{platform}' is not one of Ascend, GPU, CPU")
    nodes = read_nodes(env, platform)
    rank_table, table_ranks, world = None, None, 0
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
            servers = read_rank_table(rank_table)
            if env.get("NODE_NUM", "").strip() and nodes.num != len(servers):
                raise UserError(f"NODE_NUM is {nodes.num} but RANK_TABLE_FILE {rank_table} lists {len(servers)} "
                                "servers (use the table of this job, or unset NODE_NUM)")
            index = this_server(servers, rank_table, env)
            table_ranks = _table_devices(servers, index, rank_table, device_num, devices)
            world = sum(len(server.devices) for server in servers)
            nodes = Nodes(len(servers), index, timeout=nodes.timeout)
        rest = rest[need - 1:]
    else:
        device_num = _device_num(rest.pop(0)) if rest and rest[0].isdigit() else 1
        devices = list(range(device_num))
    world = world or device_num * nodes.num
    if not rest:
        raise UsageError("DATASET_PATH is missing")
    if len(rest) not in (1, 3, 4):
        raise UsageError("CKPT_PATH needs FREEZE_LAYER after it (none or backbone)")
    dataset = Path(rest[0])
    if not dataset.exists():
        raise UserError(f"DATASET_PATH {dataset} does not exist (pass the dataset folder; on several servers, "
                        "each needs it at this path)")
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
    if world > 1:
        train_args += ["--run_distribute", "True"]
    cfg: Config = load_config(train_args + extra)  # every flag is checked once here, not in 8 failing ranks
    output = Path(cfg.output_path).resolve()
    train_args += _without_flag(extra, "--output_path") + ["--output_path", str(output)]  # each flag once
    plan = Plan(platform, device_num, devices, rank_table, train_args, output, nodes=nodes, world_size=world,
                training=sinking.dry_run_line(cfg), model=cfg.model)
    if platform == "Ascend":
        _add_ascend_ranks(plan, table_ranks)
    else:
        _add_ranks(plan)
    return plan


def _without_flag(args: list[str], flag: str) -> list[str]:
    """`args` without `flag VALUE` and `flag=VALUE`."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(f"{flag}="):
            out.append(arg)
    return out


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    """A started process's environment: ours, the rank's, and this launcher's PID, which every rank watches so as to
    end with the launcher (src/lifeline.py)."""
    return {**os.environ, **extra, LAUNCHER_ENV: str(os.getpid())}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_port_free(port: int) -> None:
    """Node 0's scheduler listens on MASTER_PORT: a port already taken (another job's scheduler, or node 0 started
    twice, e.g. two nodes both given NODE_RANK=0) fails only after CLUSTER_TIMEOUT, with MindSpore's generic lines."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed job's TIME_WAIT is no conflict
        try:
            sock.bind(("", port))
        except OSError as exc:
            raise UserError(f"MASTER_PORT {port} is in use on this machine (another job's scheduler, or node 0 started "
                            f"twice: every other node needs its own NODE_RANK 1..; {exc.strerror}) (export "
                            "MASTER_PORT=<a free port>, the same on every node)") from None


def _add_ascend_ranks(plan: Plan, table_ranks: tuple[int, ...]) -> None:
    train = [sys.executable, str(ROOT / "train.py"), *plan.train_args]
    for device, rank in zip(plan.devices, table_ranks):
        env = {"DEVICE_ID": str(device), "RANK_ID": str(rank), "RANK_SIZE": str(plan.world_size),
               "RANK_TABLE_FILE": str(plan.rank_table), "HCCL_CONNECT_TIMEOUT": str(plan.nodes.timeout)}
        folder = plan.output_path / f"rank_{rank}"
        plan.ranks.append(Rank(rank, env, train, folder, folder / "log.txt"))


def _add_ranks(plan: Plan) -> None:
    """GPU and CPU: one process when the job has one rank, else msrun (or, see below, the workers themselves)."""
    train = [sys.executable, str(ROOT / "train.py"), *plan.train_args]
    n, nodes = plan.device_num, plan.nodes
    visible = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, plan.devices))} if plan.platform == "GPU" else {}
    plan.shared_env = visible
    if plan.world_size == 1:
        plan.ranks.append(Rank(0, {**visible, "RANK_ID": "0", "RANK_SIZE": "1"}, train, Path.cwd()))
        return
    log_dir = plan.output_path / "logs"
    first = nodes.rank * n  # global rank of this node's first worker, as msrun numbers them with --node_rank
    addr, port = nodes.master_addr or "127.0.0.1", nodes.master_port or _free_port()
    if nodes.rank > 0 and is_local_address(addr):
        # Several nodes on one machine (a test, or a trial before using servers): msrun starts a scheduler on every
        # node whose MASTER_ADDR is local, and the second one fails. Start this node's workers with the variables
        # msrun gives them (MindSpore's dynamic cluster) and supervise them here instead.
        sched_host = _ip_addresses(addr)[0]  # MindSpore takes an IP here (msrun resolves host names itself)
        plan.note = (f"node {nodes.rank}: MASTER_ADDR {addr} is this machine, where node 0's msrun runs the "
                     "scheduler; starting this node's workers directly with MindSpore's cluster variables")
        for i in range(n):
            rank = first + i
            env = {**visible, "MS_ROLE": "MS_WORKER", "MS_SCHED_HOST": sched_host, "MS_SCHED_PORT": str(port),
                   "MS_WORKER_NUM": str(plan.world_size), "MS_NODE_ID": str(rank),
                   "MS_TOPO_TIMEOUT": str(nodes.timeout), "RANK_ID": str(rank), "RANK_SIZE": str(plan.world_size),
                   "DEVICE_ID": str(i)}
            plan.ranks.append(Rank(rank, env, train, Path.cwd(), log_dir / f"worker_{rank}.log"))
        return
    if nodes.rank == 0 and nodes.master_port and os.environ.get("DRY_RUN") != "1":
        _check_port_free(port)
    plan.shared_command = ["msrun", f"--worker_num={plan.world_size}", f"--local_worker_num={n}"]
    if nodes.num > 1:
        plan.shared_command += [f"--node_rank={nodes.rank}", f"--master_addr={addr}"]
    plan.shared_command += [f"--master_port={port}", f"--log_dir={log_dir}", "--join=True",
                            f"--cluster_time_out={nodes.timeout}", str(ROOT / "train.py"), *plan.train_args]
    for i in range(n):
        plan.ranks.append(Rank(first + i, {**visible, "RANK_ID": str(first + i), "RANK_SIZE": str(plan.world_size)},
                               plan.shared_command, Path.cwd(), log_dir / f"worker_{first + i}.log"))


def describe_plan(plan: Plan) -> str:
    lines = []
    if plan.nodes.num > 1:
        ids = sorted(r.rank for r in plan.ranks)
        ranks = (f"rank {ids[0]}" if len(ids) == 1 else f"ranks {ids[0]}..{ids[-1]}"
                 if ids == list(range(ids[0], ids[-1] + 1)) else f"ranks {', '.join(map(str, ids))}")
        master = f", master {plan.nodes.master_addr}:{plan.nodes.master_port}" if plan.platform != "Ascend" else ""
        lines.append(f"node {plan.nodes.rank} of {plan.nodes.num}: {ranks} of {plan.world_size}{master}")
    if plan.note:
        lines.append(plan.note)
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
        if r.log:
            r.log.parent.mkdir(parents=True, exist_ok=True)
        out = open(r.log, "w") if r.log else None  # noqa: SIM115 - closed below
        procs.append((r, subprocess.Popen(r.command, cwd=r.cwd, env=_child_env(r.env), stdout=out,
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
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:  # blocked in a collective for the failed rank: SIGTERM waits
                    os.killpg(proc.pid, signal.SIGKILL)  # for a safe point it never reaches
                    proc.wait()
            if out:
                out.close()
    if failed:
        r, code = failed
        plan.failure = code
        text = _read(r.log)
        said = _error_lines(text)
        nodes = plan.nodes
        lost = (f", or lost another node (node 0 at {nodes.master_addr} runs the scheduler)"
                if nodes.num > 1 and plan.platform != "Ascend" else "")
        why = f": {said[0]}" if said else lost
        if nodes.num > 1 and _NO_WORKER_NETWORK in text:
            why = f": {_could_not_join(nodes)}"
        print(f"error: rank {r.rank} failed with exit code {code}{why}; the other ranks of this node were stopped "
              f"(see {r.log or 'the output above'})", file=sys.stderr)
        return 1
    print(finished(plan), flush=True)
    return 0


_NO_WORKER_NETWORK = "Building networking for MS_WORKER failed"  # MindSpore's line: no scheduler within the timeout
_BACKEND_FAILED = "could not start the communication backend"  # train.py's line when a rank cannot join (device.py)


def _could_not_join(nodes: Nodes) -> str:
    return (f"this node's workers could not join the scheduler at {nodes.master_addr}:{nodes.master_port} within "
            f"CLUSTER_TIMEOUT {nodes.timeout} s (is node 0 running the same command with NODE_RANK=0? check "
            "MASTER_ADDR and MASTER_PORT, and that this server reaches it through any firewall)")


def _read(path: Path | None) -> str:
    try:
        return path.read_text(errors="replace") if path else ""
    except OSError:
        return ""


def _error_lines(log_text: str) -> list[str]:
    """A rank's own one-line accounts of its failure in its log, without the `error: `."""
    return [line[len("error: "):] for line in log_text.splitlines() if line.startswith("error: ")]


def first_rank_error(plan: Plan) -> tuple[int, str] | None:
    """The first `error: ` line a rank of this node wrote to its log (its own one-line account of the failure); a
    rank that could not join the others says why only when no rank said anything else (it follows from another's
    failure)."""
    said = [(r.rank, line) for r in sorted(plan.ranks, key=lambda r: r.rank) for line in _error_lines(_read(r.log))]
    return next((s for s in said if _BACKEND_FAILED not in s[1]), said[0] if said else None)


def what_failed(plan: Plan) -> str:
    """What msrun's failure was, as far as this node can tell: what the scheduler (node 0) logged about the cluster
    (nodes that never joined, ranks it lost), else the failed rank's own error line, else what the workers logged."""
    nodes = plan.nodes
    master = f"{nodes.master_addr or '127.0.0.1'}:{nodes.master_port}" if nodes.master_port else "the scheduler"
    scheduler = _read(plan.output_path / "logs" / "scheduler.log")
    if "Building networking for MS_SCHED failed" in scheduler:
        missing = "the other nodes" if nodes.num > 1 else "this node's workers"
        return (f"the job's {plan.world_size} workers did not all reach the scheduler at {master} within "
                f"CLUSTER_TIMEOUT {nodes.timeout} s: {missing} never joined (start the same command on every other "
                "node with its own NODE_RANK 1.., check that each reaches MASTER_ADDR:MASTER_PORT through any "
                "firewall, or raise CLUSTER_TIMEOUT)")
    lost = sorted({int(n) for n in re.findall(r"The node: (\d+) is timed out", scheduler)})
    if lost and nodes.num > 1:
        ranks = ", ".join(map(str, lost))
        return (f"lost rank{'s' if len(lost) > 1 else ''} {ranks} of {plan.world_size}: stopped responding to the "
                "scheduler (did its server or its launcher die?)")
    said = first_rank_error(plan)
    if said and _BACKEND_FAILED not in said[1]:
        return f"rank {said[0]} failed: {said[1]}"
    if nodes.num > 1 and nodes.rank > 0 and any(_NO_WORKER_NETWORK in _read(r.log) for r in plan.ranks):
        return _could_not_join(nodes)
    if said:
        return f"rank {said[0]} failed: {said[1]}"
    if nodes.num == 1:
        return "a rank failed"
    if nodes.rank > 0:
        return f"a rank failed, or node 0 ({nodes.master_addr}, the scheduler) was lost"
    return "a rank failed or another node was lost"


def finished(plan: Plan) -> str:
    if plan.nodes.num == 1:
        return f"all {len(plan.ranks)} ranks finished; outputs in {plan.output_path}"
    where = f"outputs in {plan.output_path}" if plan.nodes.rank == 0 else "rank 0 on node 0 wrote the outputs"
    return f"all {len(plan.ranks)} ranks of node {plan.nodes.rank} finished; {where}"


def restart_cause(code: int | None) -> str | None:
    """Why a failed rank's job may be started again, or None: a user error (exit 2: the same command fails again the
    same way) is not retried, nor a failure whose rank is unknown."""
    if code is None or code == 2:
        return None
    if code < 0:
        return f"killed by {_signal_name(-code)}"
    if code > 128 and code - 128 in signal.valid_signals():
        return f"stopped by {_signal_name(code - 128)}"
    return f"exit code {code}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _checkpoints(plan: Plan) -> dict[str, int]:
    """The run folder's periodic checkpoints of this model: name -> modification time (ns), oldest first."""
    folder = plan.output_path / "checkpoint"
    found = periodic_checkpoints(folder, plan.model) if folder.is_dir() else []
    out = {}
    for path in found:
        try:
            out[path.name] = path.stat().st_mtime_ns
        except OSError:  # pruned meanwhile
            pass
    return out


def launch(argv: list[str]) -> int:
    try:
        plan = plan_launch(argv)
    except UsageError as exc:
        print(f"error: {exc}\n{USAGE}", file=sys.stderr)
        return 2
    restarts = _int_env(os.environ, "MAX_RESTARTS", 0, 0, 1000, "how often a failed job is started again")
    if restarts and plan.nodes.num > 1:
        raise UserError("MAX_RESTARTS applies to a job on one server: with several, a node restarted alone cannot "
                        "rejoin the others (unset it; relaunch every node with --resume_ckpt auto instead)")
    if os.environ.get("DRY_RUN") == "1":
        print(describe_plan(plan))
        print(f"every rank: {plan.training}")
        if restarts:
            print(f"MAX_RESTARTS {restarts}: a rank killed by a signal or crashed restarts the job with "
                  "--resume_ckpt auto; exit 2 (a user error) and Ctrl-C are not restarted")
        return 0
    before = _checkpoints(plan)  # an earlier run's, or the one an explicit --resume_ckpt continues
    for attempt in range(restarts + 1):
        code = _launch_once(plan)
        cause = restart_cause(plan.failure) if code else None
        if code == 0 or cause is None or attempt == restarts:
            if code and restarts and cause is None:
                why = "a rank exited 2, a user error that would recur" if plan.failure == 2 else \
                    "which rank failed, and how, is not known"
                print(f"the job is not restarted: {why}", flush=True)
            return code
        written = [name for name, mtime in _checkpoints(plan).items() if before.get(name) != mtime]
        if written:  # this job's own: go on from the newest whole one
            start = f"--resume_ckpt auto (the newest checkpoint is {written[-1]})"
            again = _without_flag(argv, "--resume_ckpt") + ["--resume_ckpt", "auto"]
        else:  # it saved nothing: what is in the folder is not its own (an earlier run's), so it starts as it did
            start = "the same command (it saved no checkpoint before it failed)"
            again = argv
        kept = _keep_logs(plan.output_path / "logs", attempt + 1)
        print(f"restart {attempt + 1} of {restarts}: a rank was {cause}; starting the job again with {start}"
              + (f" (the failed attempt's logs are in {kept})" if kept else ""), flush=True)
        plan = plan_launch(again)
    raise AssertionError("unreachable")


def _keep_logs(log_dir: Path, attempt: int) -> Path | None:
    """The failed attempt's worker and msrun logs, moved into logs/attempt-N/ before the next attempt writes its
    own (the cause of the failure is in them)."""
    files = sorted(p for p in log_dir.glob("*.log") if p.is_file()) if log_dir.is_dir() else []
    if not files:
        return None
    kept, n = log_dir / f"attempt-{attempt}", 1
    while kept.exists():  # an earlier job's into the same folder
        n += 1
        kept = log_dir / f"attempt-{attempt}.{n}"
    kept.mkdir()
    for path in files:
        os.replace(path, kept / path.name)
    return kept


def _launch_once(plan: Plan) -> int:
    if plan.shared_command:
        log_dir = plan.output_path / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        print(describe_plan(plan), flush=True)
        # msrun's stdout carries the workers' logs (it tails them); its own log lines and, when a rank fails, its
        # traceback go to logs/msrun.log: the terminal gets one error line from here
        with open(log_dir / "msrun.log", "w") as msrun_log:
            code = subprocess.run(plan.shared_command, env=_child_env(plan.shared_env), stderr=msrun_log).returncode
        if code != 0:
            found = re.search(r"Worker process \d+ exit with exception\. Error code: (-?\d+)",
                              _read(log_dir / "msrun.log"))
            plan.failure = int(found.group(1)) if found else None
            print(f"error: {what_failed(plan)} (msrun exit code {code}); msrun stopped this node's ranks (see the "
                  f"worker logs and msrun.log in {log_dir})", file=sys.stderr)
            return 1
        print(finished(plan), flush=True)
        return 0
    if plan.note:
        print(plan.note, flush=True)
    return _run_ranks(plan)


if __name__ == "__main__":
    from src.errors import run_cli

    sys.exit(run_cli(lambda argv: launch(list(argv))))
