"""Mutation testing of densediff's numerical core (docs/testing.md#mutation-testing): change one thing in the library,
run the tests that cover it, and count the changes the tests miss.

Two kinds of mutants, each applied alone to a private copy of the repository (the working tree is never touched):

- named: the hand-written one-line bugs of MUTATIONS below (a mask dropped, inputs swapped, a published weight changed;
  issue 31's table), each with the tests that must catch it;
- generated: walked from the AST of the modules under test (densediff/tasks, metrics, heads, inference and the
  paradigms' loss code): arithmetic operators swapped (+ -, * /, ** *), comparisons flipped (< <=, > >=, == !=),
  mask conjunctions cut (`a & b` -> `a`, -> `b`), negations dropped (`~m`, `-x`, `not c`), numbers changed
  (n -> n + 1, x -> 2x, 0 -> 1), booleans flipped, and min/max, argmin/argmax, any/all, mean/sum swapped in calls.

A mutant is killed when its tests fail (or run past --timeout, or cannot import the mutated module), survives when
they pass. A named mutant must be killed by a failing test. Usage:

    python tools/mutate.py --named                        # the named mutants (about a minute)
    python tools/mutate.py --sample 60 --seed 0           # 60 generated mutants drawn at random over the modules
    python tools/mutate.py --module densediff/tasks/depth.py --sample 20
    python tools/mutate.py --replay results.json          # the survivors of an earlier --json run, again
    python tools/mutate.py --list                         # count the generated mutants per module, run nothing

`make mutate` runs the named mutants and a 40-mutant sample. Prints one line per mutant and a summary; --json writes
every result. Use `--jobs 1` on a shared machine (the default)."""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The modules whose mutants are generated, and the tests that cover each (fast files only: a mutant runs them all).
COVERAGE = {
    "densediff/tasks/depth.py": ["tests/test_glue.py", "tests/test_losses.py", "tests/test_tasks.py"],
    "densediff/tasks/normals.py": ["tests/test_glue.py", "tests/test_losses.py", "tests/test_tasks.py"],
    "densediff/tasks/ensemble.py": ["tests/test_glue.py", "tests/test_inference.py", "tests/test_speedup.py"],
    "densediff/tasks/heads.py": ["tests/test_glue.py", "tests/test_multitask.py"],
    "densediff/tasks/losses.py": ["tests/test_glue.py", "tests/test_losses.py"],
    "densediff/tasks/albedo.py": ["tests/test_tasks.py", "tests/metrics/test_intrinsic.py"],
    "densediff/tasks/shading.py": ["tests/test_tasks.py", "tests/metrics/test_intrinsic.py"],
    "densediff/tasks/segmentation.py": ["tests/test_tasks.py", "tests/metrics/test_segmentation.py"],
    "densediff/tasks/saliency.py": ["tests/test_tasks.py", "tests/metrics/test_saliency.py"],
    "densediff/tasks/edges.py": ["tests/test_tasks.py", "tests/metrics/test_edges.py"],
    "densediff/metrics/depth.py": ["tests/metrics/test_depth.py"],
    "densediff/metrics/alignment.py": ["tests/metrics/test_depth.py"],
    "densediff/metrics/normals.py": ["tests/metrics/test_normals.py"],
    "densediff/metrics/segmentation.py": ["tests/metrics/test_segmentation.py"],
    "densediff/metrics/saliency.py": ["tests/metrics/test_saliency.py"],
    "densediff/metrics/intrinsic.py": ["tests/metrics/test_intrinsic.py"],
    "densediff/metrics/edges.py": ["tests/metrics/test_edges.py"],
    "densediff/metrics/matching.py": ["tests/metrics/test_edges.py"],
    "densediff/metrics/morphology.py": ["tests/metrics/test_edges.py"],
    "densediff/heads/bae.py": ["tests/test_glue.py", "tests/test_self_improving.py", "tests/test_bae_reference.py"],
    "densediff/metrics/uncertainty.py": ["tests/test_inference.py"],
    "densediff/paradigms/lotus.py": ["tests/test_lotus.py"],
    "densediff/inference/estimator.py": ["tests/test_glue.py", "tests/test_inference.py"],
    "densediff/inference/predictor.py": [
        "tests/test_glue.py", "tests/test_inference.py",
        "tests/test_diffusion.py::test_prompts_and_classifier_free_guidance_follow_dmp",
        "tests/test_geowizard_training.py::test_prediction_gives_both_geometries_and_the_primary_one"],
    "densediff/paradigms/denoising.py": ["tests/test_glue.py", "tests/test_diffusion.py"],
    "densediff/paradigms/multitask.py": ["tests/test_glue.py", "tests/test_multitask.py"],
}

# Where only some functions of a module are numerical core (the rest builds networks): generate only from these.
FUNCTIONS = {"densediff/paradigms/multitask.py": {"two_step_schedule", "timestep_embedding", "losses", "delta_m"}}

# Tests that run the CLIs or benchmarks (tens of seconds each): left out of every mutant's run.
SLOW = ["tests/test_tasks.py::test_predict_writes_class_ids_for_segmentation_and_images_for_albedo",
        "tests/test_tasks.py::test_nearest_colour_on_768x1024_runs_in_bounded_memory",
        "tests/test_tasks.py::test_the_tasks_import_neither_the_data_nor_inference",
        "tests/test_tasks.py::test_every_task_builds_from_its_hydra_config",
        "tests/test_self_improving.py::test_three_stages_through_train_py_resume_and_predict",
        "tests/test_speedup.py::test_gpu_suite_refuses_without_cuda",
        "tests/test_speedup.py::test_predictor_benchmark_runs_at_a_toy_size",
        "tests/test_diffusion.py::test_diffusion_recipe_runs_on_tiny_random_and_procedural",
        "tests/test_diffusion.py::test_bad_diffusion_options_are_named",
        "tests/test_inference.py::test_evaluate_scores_precomputed_predictions_by_hand"]

# Functions left out of generation: messages, plotting and I/O, where a mutant changes no number.
SKIP_FUNCTIONS = {"colorize", "per_image_rows", "__repr__", "resize_output"}


@dataclass
class Mutation:
    path: str  # relative to the repository root
    old: str  # exact text, once in the file
    new: str
    tests: list[str]
    name: str = ""


# Issue 31's table: one-line bugs a refactor could make, each a number the published recipes depend on.
MUTATIONS = [
    Mutation("densediff/tasks/normals.py", "return (torch.acos(cosine) * m).sum() / m.sum().clamp_min(1)",
             "return torch.acos(cosine).mean()", ["tests/test_glue.py", "tests/test_losses.py"],
             "angular_loss ignores its mask"),
    Mutation("densediff/heads/bae.py", "loss = loss + nll_angular(pred, gt, ok)",
             "loss = loss + nll_angular(pred, gt, torch.ones_like(ok))",
             ["tests/test_glue.py", "tests/test_self_improving.py"],
             "UG-NLL point terms ignore the validity at the sampled points"),
    Mutation("densediff/inference/estimator.py", "self.unet(torch.cat([rgb_latent, target_latent], dim=1)",
             "self.unet(torch.cat([target_latent, rgb_latent], dim=1)",
             ["tests/test_glue.py", "tests/test_inference.py"],
             "E2E single step feeds the UNet [target, rgb]"),
    Mutation("densediff/inference/predictor.py", "torch.cat([rgb_latent, latent], dim=1)",
             "torch.cat([latent, rgb_latent], dim=1)", ["tests/test_glue.py", "tests/test_inference.py"],
             "multi-step prediction feeds the UNet [target, rgb]"),
    Mutation("densediff/paradigms/denoising.py", "return masked_mse(output, target, mask[:, 0])",
             "return masked_mse(output, target, torch.ones_like(mask[:, 0]))",
             ["tests/test_glue.py", "tests/test_diffusion.py"], "latent loss ignores the valid mask"),
    Mutation("densediff/tasks/heads.py", '"edges": 50.0', '"edges": 5.0',
             ["tests/test_glue.py", "tests/test_multitask.py"],
             "DiffusionMTL's edge loss weight 50 -> 5"),
    Mutation("densediff/tasks/heads.py", '"human_parts": 2.0', '"human_parts": 1.0',
             ["tests/test_glue.py", "tests/test_multitask.py"], "DiffusionMTL's human-parts loss weight 2 -> 1"),
    Mutation("densediff/tasks/ensemble.py", "return rows[(len(rows) - 1) // 2]", "return rows[len(rows) // 2]",
             ["tests/test_glue.py", "tests/test_inference.py"], "ensemble median takes the upper middle member"),
    Mutation("densediff/tasks/depth.py",
             "        valid = self.valid(batch)\n        target, valid = masked_quantile_clip",
             '        valid = batch["valid_mask"]\n        target, valid = masked_quantile_clip',
             ["tests/test_glue.py", "tests/test_losses.py", "tests/test_tasks.py"],
             "DepthTask.loss drops the min/max depth range from its mask"),
    Mutation("densediff/heads/bae.py", "score = -coarse[:, 3].detach().flatten(1)",
             "score = coarse[:, 3].detach().flatten(1)", ["tests/test_glue.py", "tests/test_self_improving.py"],
             "Bae's sampling refines the most certain pixels"),
]


# ---- generation -------------------------------------------------------------------------------------------------

BINARY = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult,
          ast.FloorDiv: ast.Div, ast.BitOr: ast.BitAnd}
COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq}
METHODS = {"min": "max", "max": "min", "argmin": "argmax", "argmax": "argmin", "any": "all", "all": "any",
           "mean": "sum", "amin": "amax", "amax": "amin", "minimum": "maximum", "maximum": "minimum",
           "clamp_min": "clamp_max", "clamp_max": "clamp_min"}


def _variants(node: ast.AST) -> list[tuple[ast.AST, str]]:
    """(mutated copy of `node`, description) for every mutation of this node alone."""
    import copy

    out = []
    if isinstance(node, ast.BinOp):
        if type(node.op) in BINARY:
            m = copy.deepcopy(node)
            m.op = BINARY[type(node.op)]()
            out.append((m, f"{type(node.op).__name__} -> {type(m.op).__name__}"))
        if isinstance(node.op, ast.BitAnd):  # a mask conjunction: keep one side
            out += [(copy.deepcopy(node.left), "a & b -> a"), (copy.deepcopy(node.right), "a & b -> b")]
    elif isinstance(node, ast.BoolOp) and len(node.values) == 2:
        m = copy.deepcopy(node)
        m.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        out.append((m, "and <-> or"))
    elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in COMPARE:
        m = copy.deepcopy(node)
        m.ops = [COMPARE[type(node.ops[0])]()]
        out.append((m, f"{type(node.ops[0]).__name__} -> {type(m.ops[0]).__name__}"))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Invert, ast.Not)):
        out.append((copy.deepcopy(node.operand), f"drop {type(node.op).__name__}"))
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
        v = node.value
        if isinstance(v, bool):
            new = not v
        elif isinstance(v, int):
            new = v + 1
        else:
            new = v * 2 if v else 1.0
        out.append((ast.Constant(new), f"{v!r} -> {new!r}"))
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in METHODS:
        m = copy.deepcopy(node)
        m.func.attr = METHODS[node.func.attr]
        out.append((m, f".{node.func.attr}( -> .{m.func.attr}("))
    return out


@dataclass
class Mutant:
    path: str
    line: int
    col: int
    end_line: int
    end_col: int
    replacement: str
    name: str
    tests: list[str] = field(default_factory=list)


def generate(path: str) -> list[Mutant]:
    source = (ROOT / path).read_text()
    tree = ast.parse(source)
    skip: set[int] = set()  # ids of nodes not to mutate: docstrings, f-strings, annotations, skipped functions
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)) and node.body and \
                isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
            skip |= {id(n) for n in ast.walk(node.body[0])}
        if isinstance(node, ast.FunctionDef) and node.name in SKIP_FUNCTIONS:
            skip |= {id(n) for n in ast.walk(node)}
        if isinstance(node, (ast.JoinedStr, ast.Raise, ast.Assert)):
            skip |= {id(n) for n in ast.walk(node)}
        if isinstance(node, (ast.FunctionDef, ast.AnnAssign, ast.arg)):
            for ann in (getattr(node, "returns", None), getattr(node, "annotation", None)):
                if ann is not None:
                    skip |= {id(n) for n in ast.walk(ann)}
    if path in FUNCTIONS:  # everything outside the listed functions is skipped
        inside = {id(n) for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name in FUNCTIONS[path]
                  for n in ast.walk(node)}
        skip |= {id(n) for n in ast.walk(tree)} - inside
    mutants = []
    for node in ast.walk(tree):
        if id(node) in skip or not hasattr(node, "lineno"):
            continue
        for mutated, what in _variants(node):
            mutants.append(Mutant(path, node.lineno, node.col_offset, node.end_lineno, node.end_col_offset,
                                  "(" + ast.unparse(mutated) + ")", f"{path}:{node.lineno}: {what}",
                                  COVERAGE.get(path, [])))
    return mutants


def apply(source: str, mutant: Mutant) -> str:
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line.encode()))
    data = source.encode()
    start = offsets[mutant.line - 1] + mutant.col
    end = offsets[mutant.end_line - 1] + mutant.end_col
    return (data[:start] + mutant.replacement.encode() + data[end:]).decode()


# ---- running ------------------------------------------------------------------------------------------------------

def copy_repository() -> Path:
    """The tracked and untracked-but-not-ignored files, copied into a temporary folder (the mutants' workspace)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    workspace = Path(tempfile.mkdtemp(prefix="densediff-mutate-"))
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (workspace / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, workspace / name)
    return workspace


def run_tests(workspace: Path, tests: list[str], timeout: float) -> tuple[str, float]:
    env = {**os.environ, "PYTHONPATH": str(workspace), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-x", "-q",
               "-m", "not slow", *tests, *(f"--deselect={n}" for n in SLOW)]
    start = time.monotonic()
    try:
        rc = subprocess.run(command, cwd=workspace, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start
    # rc 1: a test failed; rc 2-4: collection or import failed (the mutant breaks the module: caught too, reported
    # apart); rc 5: no test ran
    outcome = {0: "survived", 1: "killed", 5: "no tests"}.get(rc, f"broken (pytest rc {rc})")
    return outcome, time.monotonic() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--named", action="store_true", help="run the named mutants (MUTATIONS)")
    parser.add_argument("--sample", type=int, default=0, help="run this many generated mutants, drawn at random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--module", action="append", help="generate from these modules only (default: COVERAGE)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per mutant (a timeout counts as killed)")
    parser.add_argument("--list", action="store_true", help="count the generated mutants per module and stop")
    parser.add_argument("--replay", type=Path,
                        help="run again the survivors recorded in this --json file (after adding tests: killed now?)")
    parser.add_argument("--tests", nargs="+", help="run these tests for every mutant instead of its covering ones")
    parser.add_argument("--json", type=Path, help="write every result here")
    args = parser.parse_args(argv)

    modules = args.module or list(COVERAGE)
    for m in modules:
        if m not in COVERAGE:
            parser.error(f"--module {m}: no covering tests known; add it to COVERAGE in tools/mutate.py")
    generated = [mutant for m in modules for mutant in generate(m)]
    if args.list:
        for m in modules:
            print(f"{sum(x.path == m for x in generated):5d}  {m}")
        print(f"{len(generated):5d}  in all")
        return 0
    todo: list[Mutant] = []
    if args.named:
        for mutation in MUTATIONS:
            source = (ROOT / mutation.path).read_text()
            if source.count(mutation.old) != 1:
                print(f"named mutation '{mutation.name}': its text is not once in {mutation.path}; update MUTATIONS",
                      file=sys.stderr)
                return 2
            start = source.index(mutation.old)
            line = source.count("\n", 0, start) + 1
            col = len(source[:start].rsplit("\n", 1)[-1].encode())
            end = start + len(mutation.old)
            todo.append(Mutant(mutation.path, line, col, source.count("\n", 0, end) + 1,
                               len(source[:end].rsplit("\n", 1)[-1].encode()), mutation.new,
                               f"{mutation.path}:{line}: {mutation.name}", mutation.tests))
    if args.sample:
        todo += random.Random(args.seed).sample(generated, min(args.sample, len(generated)))
    if args.replay:
        fields = set(Mutant.__dataclass_fields__)
        for r in json.loads(args.replay.read_text()):
            if r["outcome"] == "survived":  # with today's covering tests
                todo.append(Mutant(**{**{k: v for k, v in r.items() if k in fields},
                                      "tests": COVERAGE.get(r["path"], r["tests"])}))
    if not todo:
        parser.error("nothing to run: pass --named and/or --sample N (or --list)")
    for mutant in todo:
        mutant.tests = args.tests or mutant.tests

    workspace = copy_repository()
    results = []
    try:
        baseline, seconds = run_tests(workspace, sorted({t for m in todo for t in m.tests}), args.timeout * 3)
        if baseline != "survived":
            print(f"the covering tests do not pass on the unmutated code ({baseline}); fix them first", file=sys.stderr)
            return 2
        print(f"unmutated: covering tests pass ({seconds:.0f} s)", flush=True)
        for i, mutant in enumerate(todo, 1):
            target = workspace / mutant.path
            original = target.read_text()
            try:
                mutated = apply(original, mutant)
                compile(mutated, mutant.path, "exec")
            except (SyntaxError, ValueError) as error:
                results.append({**asdict(mutant), "outcome": f"invalid ({error})", "seconds": 0.0})
                continue
            target.write_text(mutated)
            try:
                outcome, seconds = run_tests(workspace, mutant.tests, args.timeout)
            finally:
                target.write_text(original)
            results.append({**asdict(mutant), "outcome": outcome, "seconds": round(seconds, 1)})
            print(f"[{i}/{len(todo)}] {outcome:9s} {seconds:5.0f} s  {mutant.name}  {mutant.replacement[:60]!r}",
                  flush=True)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)

    ran = [r for r in results if not r["outcome"].startswith("invalid")]
    survived = [r for r in ran if r["outcome"] in ("survived", "no tests")]
    killed = [r for r in ran if r not in survived]  # a failing test, a timeout or a module that no longer loads
    broken = [r for r in killed if r["outcome"].startswith(("broken", "timeout"))]
    print(f"\nscore: {len(killed)}/{len(ran)} killed ({100 * len(killed) / max(len(ran), 1):.0f}%; "
          f"{len(broken)} of them by a timeout or a module that no longer loads); {len(survived)} survived; "
          f"{len(results) - len(ran)} invalid")
    for r in survived:
        print(f"  survived: {r['name']}  {r['replacement'][:80]!r}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    named_missed = [r for r in results[:len(MUTATIONS) if args.named else 0] if r["outcome"] != "killed"]
    return 1 if named_missed else 0  # a named mutant is a bug the suite must catch


if __name__ == "__main__":
    sys.exit(main())
