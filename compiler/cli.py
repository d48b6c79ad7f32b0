"""The `onnx-prune` command line. Bad input: one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import json
import os
import re
import sys

import click

from onnx_prune.errors import TargetNotMet, UserError

ZOO_PREFIX = "zoo:"


def parse_input_shapes(values) -> dict:
    """`name=1x3x224x224` (repeatable, or comma-separated: `ids=1x128,mask=1x128`) -> {name: (1, 3, 224, 224)}."""
    from onnx_prune.passes.canonicalize import valid_given_dims

    shapes = {}
    for v in (item for value in values for item in value.split(",")):
        name, sep, dims = v.rpartition("=")
        try:
            parsed = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            parsed = ()
        if not sep or not name or not valid_given_dims(parsed):
            raise UserError(f"--input-shape '{v}' is not NAME=DxDx... (positive batch, other dims >= 0); "
                            "e.g. --input-shape input=1x3x224x224")
        shapes[name] = parsed
    return shapes


def load_source(model: str):
    """A path; `zoo:NAME` for a model of the built-in zoo; or `pkg.module:fn` whose fn returns an
    onnx.ModelProto, a path, or (torch.nn.Module, example inputs) to export. Returns (model,
    default shapes)."""
    if model.startswith(ZOO_PREFIX):
        from onnx_prune.models.registry import load, names

        name = model[len(ZOO_PREFIX):]
        if name not in names():
            raise UserError(f"unknown zoo model '{name}' (available: {', '.join(names())})")
        entry = load(name)
        return entry.model, dict(entry.input_shapes)
    if not os.path.exists(model) and re.fullmatch(r"[\w.]+:\w+", model):
        return _from_builder(model), {}
    return model, {}


def _from_builder(spec: str):
    from onnx_prune.compiler.calib import import_callable
    from onnx_prune.models.torch_export import as_onnx, is_torch_module

    import onnx

    fn = import_callable(spec, "model")
    try:
        built = fn()
    except Exception as exc:
        raise UserError(f"model callable '{spec}' raised {type(exc).__name__}: {exc}") from None
    if isinstance(built, tuple) and len(built) == 2 and is_torch_module(built[0]):
        return as_onnx(*built)
    if is_torch_module(built):
        raise UserError(f"model callable '{spec}' returned a torch module alone: return (module, example_inputs) "
                        "so that it can be exported")
    if isinstance(built, (onnx.ModelProto, str, os.PathLike)):
        return built
    raise UserError(f"model callable '{spec}' must return an onnx.ModelProto, a path, or (torch module, "
                    f"example inputs); it returned {type(built).__name__}")


def _fail(exc: Exception, code: int):
    click.echo(f"onnx-prune: error: {exc}", err=True)
    sys.exit(code)


class Group(click.Group):
    """Turns expected failures into one line and an exit code instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            _fail(exc, UserError.exit_code)
        except TargetNotMet as exc:
            _fail(exc, TargetNotMet.exit_code)
        except click.exceptions.Exit:
            raise
        except click.ClickException as exc:
            _fail(exc.format_message(), 2)
        except (KeyboardInterrupt, BrokenPipeError):
            sys.exit(130)
        except Exception as exc:  # a bug of ours: still one line, but say it is one
            if os.environ.get("ONNX_PRUNE_DEBUG"):
                raise
            _fail(f"internal error ({type(exc).__name__}: {exc}); rerun with ONNX_PRUNE_DEBUG=1 for details", 3)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnx-prune")
def main():
    """Structured pruning of ONNX models, verified by masked-reference equivalence.

    MODEL is an ONNX file, zoo:NAME, or pkg.module:fn returning an onnx.ModelProto, a path, or
    (torch module, example inputs)."""


input_shape_opt = click.option("--input-shape", "input_shape", multiple=True, metavar="NAME=DxD...",
                               help="Static shape for a dynamic input, for the analysis (repeatable, or comma-separated; "
                                    "a length may be 0, as an empty key/value cache).")


@main.command()
@click.argument("model")
@input_shape_opt
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def analyze(model, input_shape, as_json):
    """Show channel groups: what is coupled, what is prunable, why the rest is frozen."""
    from onnx_prune.passes.analysis import analyze_model

    src, shapes = load_source(model)
    shapes.update(parse_input_shapes(input_shape))
    a = analyze_model(src, input_shapes=shapes)
    data = {
        "groups": [{"name": g.name, "channels": g.size, "producers": g.producers, "consumers": g.consumers}
                   for g in a.groups],
        "frozen": [{"name": f.name, "channels": f.size, "reason": f.reason} for f in a.frozen],
        "coverage": a.coverage(),
        "ops_without_rule": a.ctx.unruled,
    }
    if as_json:
        click.echo(_json_text(data))
        return
    cov = data["coverage"]
    click.echo(f"{len(a.groups)} prunable groups, {len(a.frozen)} frozen; "
               f"{cov['prunable_layers']}/{cov['layers']} weight layers and "
               f"{cov['prunable_channels']}/{cov['channels']} output channels prunable")
    click.echo("\nprunable groups:")
    for g in data["groups"]:
        click.echo(f"  {g['name']}  [{g['channels']}]  producers: {', '.join(g['producers'])}"
                   + (f"  consumers: {', '.join(g['consumers'])}" if g["consumers"] else ""))
    if data["frozen"]:
        click.echo("\nfrozen:")
        for f in data["frozen"]:
            click.echo(f"  {f['name']}  [{f['channels']}]  {f['reason']}")
    if cov["unread_layers"]:
        click.echo("\nweight layers not analysed (input shape unknown, e.g. past an op without a rule):")
        click.echo("  " + ", ".join(cov["unread_layers"]))
    if data["ops_without_rule"]:  # what they touch stays, channels or not
        click.echo("\nops without a rule:")
        for op, why in data["ops_without_rule"].items():
            click.echo(f"  {op}: {why}")


@main.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the pruned model.")
@click.option("--ratio", required=True, type=float, help="Share of each group's channels to remove, in (0, 1).")
@click.option("--importance", type=click.Choice(["l1", "l2"]), default="l2", show_default=True)
@input_shape_opt
@click.option("--no-verify", is_flag=True, help="Skip the equivalence check (not recommended).")
@click.option("--report", type=click.Path(dir_okay=False), help="Write a JSON report here.")
def prune(model, output, ratio, importance, input_shape, no_verify, report):
    """Uniform baseline: every prunable group loses the same share of channels."""
    from onnx_prune.compiler.prune import check_ratio, prune_uniform
    from onnx_prune.passes.graph import save_model

    check_ratio(ratio)
    _check_outputs(model, output, report)
    src, shapes = load_source(model)
    shapes.update(parse_input_shapes(input_shape))
    result = prune_uniform(src, ratio, importance=importance, input_shapes=shapes, verify=not no_verify)
    save_model(result.model, output)
    if report:
        _write_json(report, result.report)
    r = result.report
    err = r["max_abs_error_vs_masked_reference"]
    click.echo(f"wrote {output}: {r['channels_kept']}/{r['channels_total']} channels kept in "
               f"{len(r['groups'])} groups" + (f"; verified (max abs error {err:.2e})" if err is not None else "; not verified"))


@main.command("compile")
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the model.")
@click.option("--target-speedup", required=True, help="Measured speedup to reach, e.g. 2x.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--calib", default=None, help="Calibration data: file.npz, an image folder, or pkg.module:fn. An array "
              "'labels' (one class per sample) next to the inputs makes --search full minimise the task loss.")
@click.option("--preprocess", default=None, help="For an image folder: scale=,mean=a/b/c,std=a/b/c (ImageNet's by default), resize=,layout=NCHW|NHWC (the model's input's by default).")
@input_shape_opt
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Batch size to time at (dynamic batch only).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ORT intra-op threads to time with.")
@click.option("--method", type=click.Choice(["spdy", "uniform", "global"]), default="spdy", show_default=True)
@click.option("--search", type=click.Choice(["fast", "full"]), default="fast", show_default=True,
              help="fast: SPDY's DP on the raw errors; full: also search per-group sensitivities, scored by "
                   "the calibration loss (cross-fitted: refits scored on samples they were not fitted on).")
@click.option("--search-seconds", type=click.FloatRange(min=1), default=90, show_default=True,
              help="Time for --search full's sensitivity search (its per-group probes included).")
@click.option("--recover", type=click.Choice(["layer", "global", "none"]), default="layer", show_default=True,
              help="With --calib: layer-wise least squares; global adds global AdaPrune through the torch "
                   "bridge (slower). Each stage is kept only if held-out calibration data improves.")
@click.option("--report", type=click.Path(dir_okay=False), help="Write the JSON report here (and a Markdown "
              "summary with plots next to it).")
@click.option("--finetune", "finetune_data", default=None, metavar="PKG.MOD:FN",
              help="After pruning and recovery, distil the pruned model to the dense one on these batches "
                   "(the data contract of `finetune --data`).")
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True, help="Epochs for --finetune.")
@click.option("--min-fidelity", type=float, default=None, metavar="COS",
              help="Accuracy budget: the pruned model's output cosine to the dense model's (pooled embeddings "
                   "for sentence encoders) on held-out calibration samples must reach this, else exit 1 and "
                   "no model is written. Needs --calib.")
@click.option("--max-accuracy-drop", type=float, default=None, metavar="SHARE",
              help="Accuracy budget: top-1 accuracy on held-out calibration samples may fall at most this much "
                   "(0.01 = one point), else exit 1 and no model is written. Needs --calib with 'labels'.")
def compile_cmd(model, output, target_speedup, provider, calib, preprocess, input_shape, batch_size, threads,
                method, search, search_seconds, recover, report, finetune_data, epochs, min_fidelity,
                max_accuracy_drop):
    """Prune until the speedup measured on ONNX Runtime meets the target; fail loudly otherwise."""
    from onnx_prune.compiler.compile import compile_model, parse_speedup
    from onnx_prune.passes.graph import save_model

    from onnx_prune.compiler.budget import check_budget_args

    parse_speedup(target_speedup)
    check_budget_args(min_fidelity, max_accuracy_drop, calib)
    _check_outputs(model, output, report, summary=True)
    src, shapes = load_source(model)
    shapes.update(parse_input_shapes(input_shape))
    extra = {}
    if finetune_data is not None:
        from onnx_prune.compiler.finetune import load_data
        from onnx_prune.passes.graph import load_model

        # bad data fails now, not after the search: the loaded batches go to compile as they are
        extra = {"finetune": load_data(finetune_data, load_model(src)), "epochs": epochs}
    try:
        result = compile_model(src, target_speedup, provider=provider, threads=threads, calib=calib,
                               preprocess=preprocess, input_shapes=shapes, method=method, search=search,
                               batch_size=batch_size, search_seconds=search_seconds, recover=recover, progress=True,
                               log=_log_line, min_fidelity=min_fidelity, max_accuracy_drop=max_accuracy_drop,
                               **extra)
    except TargetNotMet as exc:
        if report and exc.report is not None:
            from onnx_prune.compiler.summary import write_summary

            _write_json(report, exc.report)
            write_summary(exc.report, report)
        raise
    save_model(result.model, output)
    if report:
        from onnx_prune.compiler.summary import write_summary

        _write_json(report, result.report)
        write_summary(result.report, report)
    from onnx_prune.compiler.fidelity import similarity
    from onnx_prune.compiler.guarantee import MAX_OVERSHOOT, OVER_THE_WINDOW

    r = result.report
    fid = r.get("output_fidelity")
    ft = r.get("finetune")
    click.echo(f"wrote {output}: measured {r['measured_speedup']:.2f}x (target {r['target_speedup']:g}x, predicted "
               f"{r['predicted_speedup']:.2f}x), {r['dense_latency_ms']:.2f} -> {r['pruned_latency_ms']:.2f} ms on "
               f"{r['provider']}, {_verified_text(r)}"
               + (f", held-out output cosine {similarity(fid):.3f}{_refit_text(r)}" if fid else
                  ", accuracy neither measured nor recovered without --calib")
               + (f", {ft['epochs']} fine-tuning epoch(s): output cosine to dense {ft['output_cosine_to_dense_before']:.3f}"
                  f" -> {ft['output_cosine_to_dense_after']:.3f}" + ("" if ft["applied"] else " (not applied)")
                  if ft else "")
               + (", accuracy budget met" if r.get("accuracy_budget") else "")
               + "".join(f"; {n}" for n in r.get("notes", []) if n.startswith(OVER_THE_WINDOW)
                         and r["measured_speedup"] > MAX_OVERSHOOT * r["target_speedup"]))


def _refit_text(r) -> str:
    """The held-out cosine is that of the recovery fitted without those samples, when the model
    written was then refitted on all of them."""
    from onnx_prune.compiler.summary import refit_on_all

    again = refit_on_all(r)
    return f" (before its refit on all {again['samples']} samples)" if again.get("applied") else ""


def _verified_text(r) -> str:
    """Verification holds for the weights surgery wrote; say which later steps changed them."""
    err = r["max_abs_error_vs_masked_reference"]
    if err is not None:
        return f"verified (max abs error {err:.1e})"
    before = r.get("max_abs_error_before_recovery", r.get("max_abs_error_before_finetune"))
    then = (["refitted"] if "max_abs_error_before_recovery" in r else []) + \
        (["fine-tuned"] if (r.get("finetune") or {}).get("applied") else [])
    return f"verified (max abs error {before:.1e}), then {' and '.join(then)}"


def _log_line(message):
    """A log line on stderr that does not garble the live progress line."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Batch size for inputs with a dynamic first dim.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ORT intra-op threads (default: ORT's choice).")
@input_shape_opt
@click.option("--blocks", type=int, default=12, show_default=True, help="Interleaved measurement blocks.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def bench(models, provider, batch_size, threads, input_shape, blocks, as_json):
    """Median latency of one or two models; with two, their ratio measured side by side."""
    from onnx_prune.backends.measure import measure
    from onnx_prune.backends.ort import check_runs, feeds_for

    if len(models) > 2:
        raise UserError("bench takes one or two models")
    loaded, feeds = [], []
    for m in models:
        src, shapes = load_source(m)
        shapes.update(parse_input_shapes(input_shape))
        model, f = feeds_for(src, shapes, batch_size)
        check_runs(model, f)  # a shape the model cannot run at is the input's fault: one line, exit 2
        loaded.append(model)
        feeds.append(f)
    result = measure(loaded, feeds, provider=provider, threads=threads, blocks=blocks)
    data = {"provider": provider, "threads": threads, "batch_size": batch_size,
            "models": [{"model": m, **lat.to_dict()} for m, lat in zip(models, result.latencies)]}
    inputs = [_inputs_text(f) for f in feeds]
    if result.ratio is not None:
        data["ratio"] = result.ratio
        data["ratio_p10_p90"] = list(result.ratio_spread)
        data["same_inputs"] = inputs[0] == inputs[1]
    data["speed_change_between_blocks"] = result.speed_change
    data["steady"] = result.steady
    if as_json:
        click.echo(_json_text(data))
        return
    for m, lat in zip(models, result.latencies):
        click.echo(f"{m}: {lat.median_ms:.3f} ms median (p10 {lat.p10_ms:.3f}, p90 {lat.p90_ms:.3f}, {lat.runs} runs)")
    if result.ratio is not None:
        lo, hi = result.ratio_spread
        click.echo(f"ratio {models[0]} / {models[1]}: {result.ratio:.3f}x (p10 {lo:.3f}, p90 {hi:.3f}, interleaved)")
    if result.ratio is not None and inputs[0] != inputs[1]:  # a dense model and its pruned one take the same
        click.echo(f"warning: the two models take different inputs ({models[0]}: {inputs[0]}; {models[1]}: "
                   f"{inputs[1]}), so the ratio compares different work")
    if not result.steady:
        click.echo(f"warning: the machine's speed changed during the measurement (a model's latency varied "
                   f"{result.speed_change:.2f}x between blocks); measure again on a quiet machine")


def _inputs_text(feeds: dict) -> str:
    return ", ".join(f"{name} {'x'.join(map(str, v.shape)) or 'scalar'} {v.dtype}" for name, v in feeds.items())


@main.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the model.")
@click.option("--data", required=True, metavar="PKG.MOD:FN",
              help="A callable returning training batches, or (train_batches, val_batches); a batch is "
                   "{input: array} or ({input: array}, labels).")
@click.option("--method", type=click.Choice(["pdp", "gap", "admm", "magnitude"]), default="pdp", show_default=True)
@click.option("--pattern", default="unstructured", show_default=True, help="unstructured, N:M (e.g. 2:4) or channel.")
@click.option("--sparsity", type=float, default=None, help="Share pruned, in (0, 1); implied by N:M.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--teacher", type=click.Choice(["dense", "labels"]), default="dense", show_default=True,
              help="dense: distil to the dense model's outputs; labels: task loss on the batches' labels.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate.")
@input_shape_opt
@click.option("--sparse-initializers", is_flag=True,
              help="Store pruned weights as ONNX sparse initializers where that is smaller (unstructured, N:M).")
@click.option("--report", type=click.Path(dir_okay=False), help="Write the JSON report here.")
def finetune(model, output, data, method, pattern, sparsity, epochs, teacher, device, lr, input_shape,
             sparse_initializers, report):
    """Train under a sparsity method (PDP, GaP, StructADMM, gradual magnitude) and emit the sparse or
    channel-pruned model. Under torchrun (WORLD_SIZE > 1) the batches are sharded over ranks."""
    from onnx_prune.compiler.finetune import check_options, finetune_model
    from onnx_prune.passes.graph import save_model

    check_options(method, pattern, sparsity, epochs, teacher, device, lr)
    _check_outputs(model, output, report)
    src, shapes = load_source(model)
    shapes.update(parse_input_shapes(input_shape))
    result = finetune_model(src, data, method=method, pattern=pattern, sparsity=sparsity, epochs=epochs,
                            teacher=teacher, device=device, lr=lr, input_shapes=shapes,
                            sparse_initializers=sparse_initializers, log=lambda m: click.echo(m, err=True))
    if result.rank != 0:  # distributed: rank 0 writes
        # leave without the interpreter's teardown: under load, C++ threads of the collective
        # backend racing static destructors aborted a finished worker ("terminate called without
        # an active exception"), failing a run whose work was done
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    save_model(result.model, output)
    if report:
        _write_json(report, result.report)
    r = result.report
    lat = r.get("latency")
    losses = r["losses_per_epoch"]
    click.echo(f"wrote {output}: {r['method']} {r['pattern']}, sparsity {r['sparsity_achieved']:.4f} "
               f"(requested {r['sparsity_requested']:g}), {r['epochs']} epoch(s), loss {losses[0]:.4g}"
               + (f" -> {losses[-1]:.4g}" if len(losses) > 1 else " (its mean over the epoch)")
               + (f", validation cosine {r['validation']['output_cosine_to_dense']:.4f}" if "validation" in r else "")
               + (f", {lat['dense_ms']:.3f} -> {lat['result_ms']:.3f} ms ({lat['speedup']:.2f}x on {lat['provider']})"
                  if lat else ""))


def _check_outputs(model, output, report=None, summary=False):
    """Before any work: every file this run will write (the model, the report and, for compile, the
    report's Markdown summary and plots) can be written, none is the input model, and no two are
    the same file -- a report over the model it describes would leave JSON where a model should be."""
    named = {"-o": output}
    if report:
        named["--report"] = report
        if summary:
            from onnx_prune.compiler.summary import summary_paths

            named.update({f"the report's {what}": path for what, path in summary_paths(report).items()})
    source = None if model.startswith(ZOO_PREFIX) else os.path.realpath(model)
    seen = {}
    for what, path in named.items():
        real = os.path.realpath(path)
        if real == source or (os.path.exists(path) and os.path.exists(model) and os.path.samefile(model, path)):
            raise UserError(f"{what} {path} is the input model; choose another path (the input is never modified)")
        if real in seen:
            raise UserError(f"{what} and {seen[real]} are the same file ({path}); choose different paths")
        seen[real] = what
        if os.path.isdir(path):
            raise UserError(f"{what} {path} is a folder; give a file path")
        _check_writable_folder(what, path)


def _check_writable_folder(what, path):
    """The folder `path` goes in exists or can be made, and can be written to."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UserError(f"cannot write {what} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} {path}: the folder {folder} is not writable")


def _write_json(path, data):
    from onnx_prune.files import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(_json_text(data))


def _json_text(data) -> str:
    """Strict JSON (RFC 8259): numpy values as plain ones, NaN and infinities as null, which
    strict parsers would otherwise refuse."""
    return json.dumps(_plain(data), indent=2, allow_nan=False)


def _plain(o):
    import math

    import numpy as np

    if isinstance(o, dict):
        return {k: _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if isinstance(o, np.ndarray):
        return _plain(o.tolist())
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


if __name__ == "__main__":
    main()
