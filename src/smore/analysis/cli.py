"""``smore analyze``: parameter, compute and flexibility reports from the command line.

The main CLI calls :func:`add_parser` with its ``add_subparsers(dest="command")`` object and then ``args.func(args)``,
which returns the exit code. Each subcommand's work is a plain function of the parsed arguments returning a dict
(:func:`params_command`, :func:`flexibility_command`, :func:`overhead_command`, :func:`budget_command`), so tests and
notebooks can call it without going through a shell; the result is written to stdout as a plain-text table or, with
``--json``, as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from smore.adapters.smore import SMoREConfig, build_smore
from smore.analysis.budget import meta_model, propose_configs
from smore.analysis.flexibility import empirical_gamma, gamma_flat_bound, gamma_moe, gamma_smore
from smore.analysis.params import layer_costs, model_report, paper_overhead
from smore.errors import UserError
from smore.registry import config_from_dict

logger = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace], dict[str, Any]]


# -- config input ---------------------------------------------------------------------------------------------------


def _parse_int_list(name: str) -> Callable[[str], list[int]]:
    def parse(text: str) -> list[int]:
        try:
            values = [int(part) for part in text.split(",") if part.strip()]
        except ValueError as error:
            message = f"{name} must be comma-separated integers, e.g. 4,4 (got {text!r})"
            raise argparse.ArgumentTypeError(message) from error
        if not values:
            raise argparse.ArgumentTypeError(f"{name} must list at least one level, e.g. 4,4")
        return values

    return parse


def _parse_assignment(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--set expects key=value (YAML value, e.g. num_experts=[4,4]), got {text!r}")
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str) and "," in parsed:  # 4,4 reads as the list [4, 4], as on the other flags
        parsed = yaml.safe_load(f"[{value}]")
    return key.strip(), parsed


def _read_document(config_file: str) -> Any:
    try:
        return yaml.safe_load(Path(config_file).read_text())  # YAML is a superset of JSON: one loader for both
    except OSError as error:
        raise UserError(f"--config {config_file}: cannot read the file ({error}).") from error
    except yaml.YAMLError as error:
        raise UserError(f"--config {config_file}: not valid YAML/JSON ({error}).") from error


def run_config_model(config_file: str | None) -> str | None:
    """The ``model`` a run config names (``smore train``'s file holds ``model`` beside ``adapter``), else ``None``."""
    if config_file is None:
        return None
    document = _read_document(config_file)
    model = document.get("model") if isinstance(document, dict) and isinstance(document.get("adapter"), dict) else None
    return model if isinstance(model, str) and model else None


def config_mapping(config_file: str | None, assignments: Sequence[tuple[str, Any]] | None) -> dict[str, Any]:
    """The adapter-config mapping from a YAML/JSON file and ``--set`` overrides (applied after the file).

    A file may hold the adapter mapping itself or a larger document with it under ``adapter``. ``method`` defaults
    to ``"smore"`` when neither the file nor ``--set`` names one.
    """
    values: dict[str, Any] = {}
    if config_file is not None:
        document = _read_document(config_file)
        if isinstance(document, dict) and isinstance(document.get("adapter"), dict):
            document = document["adapter"]
        if not isinstance(document, dict):
            raise UserError(
                f"--config {config_file} must hold a mapping of adapter fields (e.g. method: smore, num_experts: "
                f"[4, 4]), not {type(document).__name__}."
            )
        values.update(document)
    for key, value in assignments or ():
        values[key] = value
    values.setdefault("method", "smore")
    return values


def _config(args: argparse.Namespace):
    return config_from_dict(config_mapping(args.config, args.set))


def _parse_names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, e.g. lora,smore (got {text!r})")
    return names


# -- handlers -------------------------------------------------------------------------------------------------------


def params_command(args: argparse.Namespace) -> dict[str, Any]:
    """``analyze params``: per-component parameters, active parameters and multiply-adds of one adapter on a layer
    of ``--in-features``; without it, of the adapter on every layer it selects in a model (``--model-config``, or
    the ``model`` of a run config given as ``--config``), the shapes taken from the model."""
    config = _config(args)
    if args.in_features is None:
        return _model_params(args, config)
    out_features = args.out_features if args.out_features is not None else args.in_features
    costs = layer_costs(config, args.in_features, out_features)
    return {
        "method": config.method,
        "in_features": args.in_features,
        "out_features": out_features,
        "parameters": costs["parameters"],
        "active": costs["active"],
        "flops_per_token": costs["flops"],
        "config": config.to_dict(),
    }


def _model_params(args: argparse.Namespace, config) -> dict[str, Any]:
    spec = getattr(args, "model_config", None) or run_config_model(args.config)
    if spec is None:
        raise UserError(
            "analyze params needs a layer or a model: give --in-features (and --out-features), or --model-config "
            "NAME|PATH, or a run config with model: as --config."
        )
    report = model_report(meta_model(spec), config)
    groups: dict[tuple[int, int], list] = {}
    for layer in report.layers:  # a model's layers come in a few shapes: one row each
        groups.setdefault((layer.in_features, layer.out_features), []).append(layer)
    shapes = [
        {
            "in_features": d_in,
            "out_features": d_out,
            "modules": len(layers),
            "parameters": sum(layer.parameters for layer in layers),
            "active": _sum_known([layer.active for layer in layers]),
            "flops_per_token": _sum_known([layer.flops for layer in layers]),
        }
        for (d_in, d_out), layers in groups.items()
    ]
    summary = report.to_dict()
    del summary["layers"]
    return {**summary, "model": spec, "shapes": shapes, "config": config.to_dict()}


def _sum_known(values: list[int | None]) -> int | None:
    """The sum, or ``None`` when the method has no formula for one of them."""
    return None if any(value is None for value in values) else sum(values)


def flexibility_command(args: argparse.Namespace) -> dict[str, Any]:
    """``analyze flexibility``: Γ of S'MoRE (Thm 3.4), the flat-mixture bound (Thm 3.3) and a one-level MoE.

    The MoE comparison defaults to the same experts pooled in one level (``Σ_ℓ s_ℓ``) with the token-level fanout
    of the top (``f_{L-1}``), the paper's worked example (s = [4, 4], f = [2, 2] against 8 experts top-2).
    ``--empirical`` checks Thm 3.4 by brute force on a small random adapter (init ``normal``, switch gate, rank 2,
    ``out_features = d_L + 8`` so the final projection cannot merge outputs).
    """
    num_experts, top_k = list(args.num_experts), list(args.top_k)
    moe_experts = args.moe_experts if args.moe_experts is not None else sum(num_experts)
    moe_top_k = args.moe_top_k if args.moe_top_k is not None else top_k[-1]
    result: dict[str, Any] = {
        "num_experts": num_experts,
        "top_k": top_k,
        "gamma_smore": gamma_smore(num_experts, top_k),
        "gamma_flat_bound": gamma_flat_bound(num_experts, top_k),
        "moe_experts": moe_experts,
        "moe_top_k": moe_top_k,
        "gamma_moe": gamma_moe(moe_experts, moe_top_k),
    }
    if args.empirical:
        levels = len(num_experts)
        config = SMoREConfig(
            num_experts=num_experts,
            top_k=top_k,
            ranks=[2] * levels,
            router_dims=[8] * levels,
            down_proj_dim=8,
            activation=args.activation,
            gate="switch",
            init="normal",
        )
        in_features = 16
        with torch.random.fork_rng(devices=[]):  # a seeded draw that leaves the caller's RNG where it was
            torch.manual_seed(args.seed)
            delta = build_smore(config, in_features, config.widths[-1] + 8)
            token = torch.randn(in_features)
        result["empirical"] = {
            "activation": args.activation,
            "weights": args.weights,
            "seed": args.seed,
            "gamma": empirical_gamma(delta, token, tol=args.tol, weights=args.weights),
        }
    return result


def overhead_command(args: argparse.Namespace) -> dict[str, Any]:
    """``analyze overhead``: S'MoRE's extra compute in the paper's Table 1 convention (SPEC §1.7)."""
    config = _config(args)
    if not isinstance(config, SMoREConfig):
        raise UserError(f"analyze overhead follows the S'MoRE paper's Table 1; method={config.method!r} is not smore.")
    overhead = paper_overhead(config, args.in_features)
    return {
        "in_features": args.in_features,
        "num_experts": config.num_experts,
        "ranks": config.ranks,
        "shared_pool": config.shared_pool,
        **overhead.to_dict(),
        "percent": 100.0 * overhead.ratio,
    }


def budget_command(args: argparse.Namespace) -> dict[str, Any]:
    """``analyze budget``: one config per method at the same trainable-parameter budget on one model.

    The model is built from its config on the meta device (no weights); the budget is ``--budget`` or the trainable
    count of the ``--match`` config. See :func:`smore.analysis.budget.propose_configs`.
    """
    model = meta_model(args.model_config)
    match = config_from_dict(config_mapping(args.match, None)) if args.match else None
    starts = [config_from_dict(config_mapping(path, None)) for path in args.config or ()]
    rows = propose_configs(
        model,
        match if match is not None else args.budget,
        methods=args.methods,
        configs=starts,
        target_modules=args.target_modules,
        tolerance=args.tolerance,
        strict=not args.no_strict,
    )
    budget = args.budget if match is None else model_report(model, match).trainable
    return {
        "model_config": args.model_config,
        "model": type(model).__name__,
        "base_parameters": sum(p.numel() for p in model.parameters()),
        "budget": budget,
        "match": None if match is None else match.to_dict(),
        "tolerance": args.tolerance,
        "rows": [row.to_dict() for row in rows],
    }


# -- output ---------------------------------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: left-aligned first column, right-aligned numbers, thousands separators."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, int):
            return f"{value:,}"
        if isinstance(value, float):
            return f"{value:.6g}"
        if isinstance(value, list):
            return ",".join(str(v) for v in value)
        return str(value)

    text = [[cell(h) for h in headers]] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(line[i]) for line in text) for i in range(len(headers))]
    lines = []
    for number, line in enumerate(text):
        parts = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])]
        lines.append("  ".join(parts).rstrip())
        if number == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _format_params(result: dict[str, Any]) -> str:
    if "shapes" in result:
        return _format_model_params(result)
    parameters = result["parameters"]
    active = result["active"] or {}
    flops = result["flops_per_token"] or {}
    names = list(parameters) + [k for k in list(active) + list(flops) if k not in parameters]
    names = [n for n in names if n != "total"] + ["total"]
    head = f"{result['method']} adapter on a {result['in_features']} -> {result['out_features']} layer"
    rows = [(name, parameters.get(name), active.get(name), flops.get(name)) for name in names]
    return head + "\n" + format_table(("component", "parameters", "active", "MACs/token"), rows)


def _format_model_params(result: dict[str, Any]) -> str:
    head = (
        f"{result['method']} adapters on {result['modules']} layers of {result['model']} "
        f"({result['base_parameters']:,} base parameters; trainable {result['trainable_share']:.2%})"
    )
    rows = [
        (
            f"{s['in_features']} -> {s['out_features']} ×{s['modules']}",
            s["parameters"],
            s["active"],
            s["flops_per_token"],
        )
        for s in result["shapes"]
    ]
    rows.append(("total", result["trainable"], result["active"], result["flops_per_token"]))
    return head + "\n" + format_table(("layers", "parameters", "active", "MACs/token"), rows)


def _format_overhead(result: dict[str, Any]) -> str:
    """The paper's Table 1 quantities, labelled as there; every value an integer but the percentage, so the
    column's digits line up (a ratio beside a percentage in ``%g`` did not)."""
    levels = ", ".join(f"{s}×r{r}" for s, r in zip(result["num_experts"], result["ranks"]))
    pool = ", shared pool" if result["shared_pool"] else ""
    head = f"S'MoRE overhead, paper Table 1 convention: d={result['in_features']:,}, experts {levels}{pool}"
    rows = [
        ("top width d_L", result["top_width"]),
        ("main cost 2·d·d_L", result["main"]),
        ("overhead Δ", result["delta"]),
        ("Δ / main", f"{result['percent']:.2f} %"),
    ]
    return head + "\n" + format_table(("quantity", "value"), rows)


def _format_mapping(result: dict[str, Any]) -> str:
    rows = []
    for key, value in result.items():
        if isinstance(value, dict):
            rows.extend((f"{key}.{k}", v) for k, v in value.items())
        else:
            rows.append((key, value))
    return format_table(("quantity", "value"), rows)


def _format_budget(result: dict[str, Any]) -> str:
    source = f" (= {result['match']['method']} --match)" if result["match"] else ""
    head = (
        f"budget {result['budget']:,} trainable parameters{source}, ±{result['tolerance']:.0%}, on "
        f"{result['model_config']} ({result['model']}, {result['base_parameters']:,} parameters)"
    )
    rows, notes = [], []
    width = max((len(row["summary"]) for row in result["rows"]), default=0)
    for row in result["rows"]:
        deviation = None if row["deviation"] is None else f"{row['deviation']:+.2%}"
        method = row["method"] + (" (missing)" if row["missing"] else "")
        summary = row["summary"].ljust(width)  # left-aligned text in a table that right-aligns numbers
        rows.append((method, summary, row["trainable"], row["active"], row["flops_per_token"], row["gamma"], deviation))
        if row["missing"]:
            notes.append(f"missing: {row['missing']}")
    headers = ("method", "config", "trainable", "active/token", "MACs/token", "Γ", "deviation")
    return "\n".join([head, format_table(headers, rows), *notes])


def _runner(handler: Handler, formatter: Callable[[dict[str, Any]], str]) -> Callable[[argparse.Namespace], int]:
    """Wrap a handler into ``args.func``: write its result, turn a ``UserError`` into exit code 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            result = handler(args)
        except UserError as error:
            sys.stderr.write(f"error: {error}\n")
            return 2
        text = json.dumps(result, indent=2) if args.json else formatter(result)
        sys.stdout.write(text + "\n")  # the command's output, not a log line
        return 0

    run.handler = handler  # type: ignore[attr-defined]
    return run


# -- parser ---------------------------------------------------------------------------------------------------------


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="adapter config mapping (YAML or JSON), incl. method")
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        type=_parse_assignment,
        default=[],
        help="override one config field (YAML value, e.g. num_experts=[4,4]); repeatable; method defaults to smore",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``analyze`` (``params``, ``flexibility``, ``overhead``, ``budget``) on the main CLI's subparsers."""
    analyze = subparsers.add_parser("analyze", help="parameter, compute and flexibility reports")
    commands = analyze.add_subparsers(dest="analysis", metavar="{params,flexibility,overhead,budget}")
    commands.required = True

    params = commands.add_parser("params", help="parameters, active parameters and MACs of one adapter")
    _add_config_arguments(params)
    params.add_argument("--in-features", type=int, help="input width of one adapted layer (else: --model-config)")
    params.add_argument(
        "--model-config",
        metavar="NAME|PATH",
        help="without --in-features: every layer the config selects in this model (as analyze budget's; default: "
        "the model of a run config given as --config)",
    )
    params.add_argument("--out-features", type=int, help="output width (default: --in-features)")
    params.set_defaults(func=_runner(params_command, _format_params))

    flexibility = commands.add_parser("flexibility", help="structural flexibility Γ (paper Thm 3.3, 3.4)")
    flexibility.add_argument("--num-experts", type=_parse_int_list("--num-experts"), required=True, help="e.g. 4,4")
    flexibility.add_argument("--top-k", type=_parse_int_list("--top-k"), required=True, help="e.g. 2,2")
    flexibility.add_argument("--moe-experts", type=int, help="experts of the flat MoE compared (default: Σ s_ℓ)")
    flexibility.add_argument("--moe-top-k", type=int, help="top-k of the flat MoE compared (default: top level's)")
    flexibility.add_argument("--empirical", action="store_true", help="also count Γ by enumerating routing trees")
    flexibility.add_argument(
        "--activation", default="tanh", choices=["identity", "tanh", "relu", "prelu"], help="σ for --empirical"
    )
    flexibility.add_argument(
        "--weights", default="router", choices=["router", "uniform"], help="α for --empirical (uniform: 1/f)"
    )
    flexibility.add_argument("--seed", type=int, default=0, help="seed of the random adapter for --empirical")
    flexibility.add_argument("--tol", type=float, default=1e-6, help="relative tolerance of distinct outputs")
    flexibility.add_argument("--json", action="store_true", help="print JSON instead of a table")
    flexibility.set_defaults(func=_runner(flexibility_command, _format_mapping))

    overhead = commands.add_parser("overhead", help="compute overhead in the paper's Table 1 convention")
    _add_config_arguments(overhead)
    overhead.add_argument("--in-features", type=int, required=True, help="model width d (e.g. 4096)")
    overhead.set_defaults(func=_runner(overhead_command, _format_overhead))

    budget = commands.add_parser("budget", help="one config per method at the same trainable-parameter budget")
    budget.add_argument(
        "--model-config",
        required=True,
        metavar="NAME|PATH",
        help="tiny, smollm2-135m, llama-3.2-1b, or a local config.json / model folder (built on the meta device)",
    )
    amount = budget.add_mutually_exclusive_group(required=True)
    amount.add_argument("--budget", type=int, help="trainable parameters to match, e.g. 200000")
    amount.add_argument(
        "--match", metavar="FILE", help="adapter config (YAML/JSON) whose trainable count is the budget"
    )
    budget.add_argument(
        "--config",
        metavar="FILE",
        action="append",
        default=[],
        help="starting config of one row (structure kept, ranks searched), e.g. a S'MoRE (2-2); repeatable",
    )
    budget.add_argument("--methods", type=_parse_names, help="comma-separated methods (default: all)")
    budget.add_argument(
        "--target-modules", type=_parse_names, help="linear-level methods' modules (default: gate,up,down_proj)"
    )
    budget.add_argument("--tolerance", type=float, default=0.05, help="allowed relative deviation (default 0.05)")
    budget.add_argument("--no-strict", action="store_true", help="mark methods that miss the tolerance, do not fail")
    budget.add_argument("--json", action="store_true", help="print JSON instead of a table")
    budget.set_defaults(func=_runner(budget_command, _format_budget))
    return analyze


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser with only ``analyze``, as the main CLI would register it (for tests and scripts)."""
    parser = argparse.ArgumentParser(prog="smore")
    add_parser(parser.add_subparsers(dest="command"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``smore analyze ...`` from ``argv`` (without the program name); returns the exit code."""
    args = build_parser().parse_args(argv)
    if getattr(args, "func", None) is None:
        build_parser().print_usage(sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
