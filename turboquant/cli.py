"""``turboquant`` command line.

Subcommands are registered by functions in :data:`COMMANDS`; each receives the top-level
subparsers object, adds its parser(s) and sets ``func`` (called with the parsed namespace,
returning an exit code). To add a command, write ``def _register_x(sub): ...`` and append it.

    turboquant index build  --input X.npy --bits 4 --out idx.tq
    turboquant index search --index idx.tq --queries Q.npy -k 10
    turboquant index info   idx.tq                  (or --index idx.tq)
    turboquant demo [--key-bits 4 --value-bits 2 ...]     (SmolLM2 KV-cache demo)

Benchmarks are scripts under ``benchmarks/`` in a checkout, not commands of the installed package.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import TurboQuantError, __version__

Register = Callable[[Any], None]


# --------------------------------------------------------------------------- helpers


def _progress(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar (to stderr) when enabled and the input is large enough to be worth one."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="vec", unit_scale=True, disable=not enabled, file=sys.stderr, leave=False)


def _load_matrix(path: Path, name: str) -> np.ndarray:
    """A 2-D float ``.npy`` file, memory-mapped so inputs larger than RAM stream through."""
    if not path.is_file():
        raise TurboQuantError(f"{name} file {path} does not exist")
    if path.suffix != ".npy":
        raise TurboQuantError(f"{name} must be a .npy file, got {path}")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise TurboQuantError(f"{name} {path}: not a readable .npy file: {exc}") from None
    if arr.ndim != 2 or arr.dtype.kind != "f":
        raise TurboQuantError(f"{name} {path}: expected a 2-D float array, got shape {arr.shape} dtype {arr.dtype}")
    return arr


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _read_lines(path: Path | None, option: str) -> list[str] | None:
    if path is None:
        return None
    if not path.is_file():
        raise TurboQuantError(f"{option} file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TurboQuantError(f"{option} {path}: cannot be read as UTF-8 text: {exc}") from None
    # "\n" only: str.splitlines would also split inside a label at \x0c, \x1c or \u2028
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _check_rows(x: np.ndarray, offset: int, option: str, path: Path, cosine: bool) -> None:
    """Name the user's file and row for the first NaN/Inf (or, for cosine, zero) row of a batch.

    The library's own check names its argument (``x``); on the command line the file and the
    row number are what the user can act on.
    """
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        row = offset + int(np.argmax(bad))
        what = "NaN" if np.isnan(x[row - offset]).any() else "Inf"
        raise TurboQuantError(f"{option} {path} contains {what} at row {row}")
    norms_sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)  # float64 accumulation, no float64 copy of x
    big = norms_sq > float(np.finfo(np.float32).max) ** 2
    if big.any():
        raise TurboQuantError(f"{option} {path}: the norm of row {offset + int(np.argmax(big))} overflows float32")
    if cosine and (norms_sq == 0).any():
        row = offset + int(np.argmax(norms_sq == 0))
        raise TurboQuantError(f"{option} {path}: row {row} is a zero vector, which has no direction for --metric cosine")


def _load_ids(path: Path, n: int) -> np.ndarray:
    """``--ids``: a 1-D integer ``.npy`` of ``n`` distinct non-negative ids."""
    if not path.is_file():
        raise TurboQuantError(f"--ids file {path} does not exist")
    try:
        ids = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise TurboQuantError(f"--ids {path}: not a readable .npy file: {exc}") from None
    if ids.shape != (n,):
        raise TurboQuantError(f"--ids {path} has shape {ids.shape}; the --input file has {n} rows, so expected ({n},)")
    if ids.dtype.kind not in "iu":
        raise TurboQuantError(f"--ids {path} must hold integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    if n and ids.min() < 0:
        raise TurboQuantError(f"--ids {path}: ids must be non-negative, row {int(np.argmin(ids))} is {ids.min()}")
    uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][0]
        rows = np.flatnonzero(ids == dup)[:2]
        raise TurboQuantError(f"--ids {path}: id {dup} appears more than once (rows {rows[0]} and {rows[1]})")
    return ids


# --------------------------------------------------------------------------- index commands


def _index_build(args: argparse.Namespace) -> int:
    from .index import TurboQuantIndex

    if args.ray:
        from .sharded import cli_build

        return cli_build(args)
    if len(args.input) != 1:
        raise TurboQuantError(f"{len(args.input)} --input files need --ray (a sharded index); give one file")
    args.input = args.input[0]
    x = _load_matrix(args.input, "--input")
    ids = None if args.ids is None else _load_ids(args.ids, x.shape[0])
    if args.batch < 1:
        raise TurboQuantError(f"--batch must be >= 1, got {args.batch}")
    index = TurboQuantIndex(
        x.shape[1], args.bits, args.metric, rotation=args.rotation, seed=args.seed, norm_dtype=args.norm_dtype,
        engine="torch",  # no fast-scan mirror needed to build; search builds it
    )  # fmt: skip
    index.reserve(x.shape[0])  # one allocation: no growth slack while streaming the file in batches
    start = time.perf_counter()
    with _progress(x.shape[0], "encoding", not args.quiet and x.shape[0] >= args.batch) as bar:
        for part in _batches(x.shape[0], args.batch):
            batch = np.asarray(x[part])
            _check_rows(batch, part.start, "--input", args.input, args.metric == "cosine")
            index.add(batch, None if ids is None else ids[part])
            bar.update(part.stop - part.start)
    elapsed = time.perf_counter() - start
    index.save(args.out)
    if not args.quiet:
        size = args.out.stat().st_size
        print(
            f"indexed {len(index)} vectors (d={index.dim}, bits={index.bits}, metric={index.metric.value}) "
            f"in {elapsed:.2f} s; "
            f"{index.bytes_per_vector} B/vector, {args.out} is {size / 1e6:.2f} MB"
        )
    return 0


def _index_search(args: argparse.Namespace) -> int:
    from .index import TurboQuantIndex

    if args.ray:
        from .sharded import cli_open

        index: Any = cli_open(args)
    else:
        index = TurboQuantIndex.load(args.index, mmap=args.mmap)
    queries = _load_matrix(args.queries, "--queries")
    if queries.shape[1] != index.dim:
        raise TurboQuantError(
            f"--queries {args.queries} has dimension {queries.shape[1]}, but --index {args.index} holds d={index.dim}"
        )
    # labels are checked before searching: a wrong file should fail fast, not after the search
    labels, query_labels = _read_lines(args.labels, "--labels"), _read_lines(args.query_labels, "--query-labels")
    if labels is not None:
        stored = index.ids
        expected = int(stored.max()) + 1 if stored.size else 0
        if len(labels) != expected:
            ids_text = f"ids 0..{expected - 1}" if expected == len(stored) else f"ids up to {expected - 1}"
            raise TurboQuantError(
                f"--labels {args.labels} has {len(labels)} lines, but --index {args.index} holds {len(stored)} "
                f"vectors with {ids_text}, so it needs {expected} lines (line i labels id i)"
            )
    if query_labels is not None and len(query_labels) != len(queries):
        raise TurboQuantError(
            f"--query-labels {args.query_labels} has {len(query_labels)} lines, "
            f"but --queries {args.queries} has {len(queries)} rows"
        )
    if args.limit is not None:
        if args.limit < 0:
            raise TurboQuantError(f"--limit must be >= 0, got {args.limit}")
        queries = queries[: args.limit]
    if args.batch < 1:
        raise TurboQuantError(f"--batch must be >= 1, got {args.batch}")
    if args.k < 1:
        raise TurboQuantError(f"-k must be >= 1, got {args.k}")
    if args.k > len(index) and not args.clip_k:
        raise TurboQuantError(
            f"-k {args.k} exceeds the {len(index)} vectors in --index {args.index} (pass --clip-k to return {len(index)})"
        )
    k = min(args.k, len(index)) if args.clip_k else args.k
    scores = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    with _progress(len(queries), "searching", not args.quiet and len(queries) >= args.batch) as bar:
        for part in _batches(len(queries), args.batch):
            batch = np.asarray(queries[part])
            _check_rows(batch, part.start, "--queries", args.queries, False)
            scores[part], ids[part] = index.search(batch, k)
            bar.update(part.stop - part.start)
    if args.out is not None:
        np.savez(args.out, scores=scores, ids=ids)
        if not args.quiet:
            print(f"wrote scores and ids of {len(queries)} queries to {args.out}")
        return 0
    if args.json:
        for qi in range(len(queries)):
            print(
                json.dumps({"query": qi, "ids": ids[qi].tolist(), "scores": [round(float(s), 6) for s in scores[qi]]})
            )
        return 0
    for qi in range(len(queries)):
        head = f"query {qi}" + (f": {query_labels[qi]}" if query_labels is not None and qi < len(query_labels) else "")
        print(head)
        for rank, (i, s) in enumerate(zip(ids[qi], scores[qi]), 1):
            text = f"  {labels[i]}" if labels is not None and 0 <= i < len(labels) else ""
            print(f"  {rank:>3}. id={i:<10} score={s:.4f}{text}")
    return 0


def _index_info(args: argparse.Namespace) -> int:
    from .index import TurboQuantIndex

    if args.path is not None and args.index is not None and args.path != args.index:
        raise TurboQuantError(f"two different index files given: {args.path} and --index {args.index}")
    path = args.path if args.path is not None else args.index
    if path is None:
        raise TurboQuantError("no index file given: turboquant index info PATH")
    index = TurboQuantIndex.load(path, mmap=True)
    info = {
        "vectors": len(index), "config": index.quantizer_config.to_dict(), "metric": index.metric.value,
        "bytes_per_vector": index.bytes_per_vector, "nbytes": index.nbytes, "file_bytes": path.stat().st_size,
    }  # fmt: skip
    print(json.dumps(info, indent=2))
    return 0


def _register_index(sub: Any) -> None:
    parser = sub.add_parser(
        "index", help="build and search compressed vector indexes", description="Compressed vector search index."
    )
    isub = parser.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    build = isub.add_parser("build", help="quantize a .npy matrix into an index file", description="Quantize the rows "
                            "of a .npy matrix (no training) and write them to an index file.")  # fmt: skip
    build.add_argument("--input", type=Path, required=True, nargs="+", help="(n, d) float .npy file (memory-mapped); several files with --ray")
    build.add_argument(
        "--bits", type=float, default=4.0, help="bits per coordinate, 1..8, fractional allowed (default 4)"
    )
    build.add_argument("--out", type=Path, required=True, help="index file to write (atomically)")
    build.add_argument("--metric", choices=["ip", "cosine", "l2"], default="ip",
                       help="ip: inner product; cosine: vectors and queries normalised; l2: squared distance "
                            "(default ip)")  # fmt: skip
    build.add_argument("--rotation", choices=["haar", "hadamard"], default="haar",
                       help="random rotation applied before quantizing (default haar: best measured recall)")
    build.add_argument("--seed", type=int, default=0, help="seed of the random rotation, 0..2^64-1 (default 0)")
    build.add_argument("--norm-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                       help="storage type of the per-vector norms (float16 saves 2 bytes per vector)")
    build.add_argument("--ids", type=Path, help="optional (n,) integer .npy of distinct ids (default 0..n-1)")
    build.add_argument("--batch", type=int, default=65536, help="vectors encoded per step (default 65536)")
    build.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    ray_opts = build.add_argument_group("sharded (Ray; pip install 'turboquant[ray]')")
    ray_opts.add_argument("--ray", action="store_true", help="build a sharded index directory with Ray tasks")
    ray_opts.add_argument("--shards", type=int, help="number of shard files (default: one per --input)")
    ray_opts.add_argument("--column", help="embedding column of Parquet inputs")
    ray_opts.add_argument("--ray-address", help="Ray cluster address (default: a local cluster)")
    build.set_defaults(func=_index_build)

    search = isub.add_parser("search", help="k nearest neighbours of each query",
                             description="Search an index file with the rows of a .npy matrix.")
    search.add_argument("--index", type=Path, required=True, help="index file written by 'turboquant index build'")
    search.add_argument("--queries", type=Path, required=True, help="(nq, d) float .npy file")
    search.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    search.add_argument("--clip-k", action="store_true", help="use min(k, index size) instead of failing")
    search.add_argument("--limit", type=int, help="only the first LIMIT queries")
    search.add_argument("--out", type=Path, help="write scores and ids to this .npz instead of printing")
    search.add_argument("--json", action="store_true", help="print one JSON line per query")
    search.add_argument("--labels", type=Path,
                        help="text file, line i labels stored id i (printed with results; needs max id + 1 lines)")
    search.add_argument("--query-labels", type=Path, help="text file, line i labels query i (one line per query)")
    search.add_argument("--mmap", action="store_true", help="memory-map the index file")
    search.add_argument("--batch", type=int, default=4096, help="queries per search call (default 4096)")
    search.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    ray_opts = search.add_argument_group("sharded (Ray)")
    ray_opts.add_argument("--ray", action="store_true", help="--index is a sharded index directory")
    ray_opts.add_argument("--actors", type=int, help="shard actors (default: one per shard)")
    ray_opts.add_argument("--engine", choices=["torch", "fastscan", "auto"], default="torch", help="per-shard engine")
    ray_opts.add_argument("--ray-address", help="Ray cluster address (default: a local cluster)")
    search.set_defaults(func=_index_search)

    info = isub.add_parser("info", help="print an index file's configuration and size",
                           description="Print an index file's configuration and size as JSON.")
    info.add_argument("path", type=Path, nargs="?", metavar="PATH", help="index file")
    info.add_argument("--index", type=Path, help="index file (same as PATH)")
    info.set_defaults(func=_index_info)


# --------------------------------------------------------------------------- demo


def _forward(target: str) -> Callable[[argparse.Namespace], int]:
    """A handler that passes the remaining arguments to ``module:function`` (which owns its parser)."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        module_name, func_name = target.split(":")
        return int(getattr(importlib.import_module(module_name), func_name)(list(args.rest)) or 0)

    return run


def _register_demo(sub: Any) -> None:
    demo = sub.add_parser(
        "demo", add_help=False, help="answer a prompt with SmolLM2-135M and the TurboQuant KV cache; print memory/quality"
    )
    demo.set_defaults(func=_forward("turboquant.demo.run:main"))


COMMANDS: list[Register] = [_register_demo, _register_index]
"""Subcommand registrars, in help order."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turboquant", description="TurboQuant: calibration-free vector quantization.")
    parser.add_argument("--version", action="version", version=f"turboquant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``turboquant`` script; returns the exit code (2 on bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # ``demo`` owns its parser: everything after it is its own (argparse's REMAINDER cannot take
    # leading options such as --help inside a subparser).
    n_owned = 1 if argv[:1] == ["demo"] else 0
    if n_owned:
        args = parser.parse_args(argv[:n_owned])
        args.rest = argv[n_owned:]
    else:
        args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TurboQuantError as exc:
        print(f"turboquant: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
