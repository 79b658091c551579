"""The accuracy budget: which data a reduced-precision candidate (bf16, fp16, int8) is judged on,
and the judgement (docs/selection.md).

Every reduced-precision payload is compared with the FP32 model run by ONNX Runtime, on data chosen
by what the user gave:

- **labelled** (``--eval``, or a registered model's held-out split): top-1 accuracy may drop at most
  ``--max-accuracy-drop`` points below FP32's;
- **unlabelled** (``--samples`` or ``--calib``, at least :data:`MIN_GATE_SAMPLES` inputs): top-1
  agreement with FP32 at least ``--min-agreement``;
- **synthetic** (no data at all): bf16 and fp16 are judged by agreement on the build's own
  validation samples, a weaker proof recorded as such; int8 is left out (its quantizer needs real
  calibration inputs).

Outputs that are not class scores (every output of a model that is not a classifier, and under
``synthetic`` every output) must also stay within the target's ``tolerance.<precision>.rtol`` of
their spread: ``max |payload - fp32| / (max - min of fp32)`` over the gate's inputs.

INT8 calibrates on data the gate never scores: a registered split's first third, or the first half
of ``--calib`` when the gate has no other unlabelled inputs.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from edgesmith.runtime.manifest import AccuracyGate, GateData, Quantization, QuantizationData, TensorSpec
from edgesmith.toolchain.errors import UserError, first_line

MIN_GATE_SAMPLES = 64  # real inputs an unlabelled gate needs; fewer cannot resolve a 1% disagreement
MAX_CALIBRATION = 300  # NNCF's default subset size; more adds time, not accuracy, on small models
DEFAULT_MAX_DROP = 1.0
DEFAULT_MIN_AGREEMENT = 0.99

Proof = Literal["labelled", "unlabelled", "synthetic"]


@dataclass
class Budget:
    """The bounds a reduced-precision candidate must meet (``--max-accuracy-drop``, ``--min-agreement``)."""

    max_accuracy_drop: float = DEFAULT_MAX_DROP
    min_agreement: float = DEFAULT_MIN_AGREEMENT


@dataclass
class Dataset:
    """Inputs of a one-input model, samples on axis 0 (each shaped like the input without its batch
    axis of 1), and integer labels when labelled."""

    x: np.ndarray
    y: np.ndarray | None
    origin: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(np.asarray(self.x, order="C").tobytes()).hexdigest()

    def samples(self) -> list[list[np.ndarray]]:
        """One single-input sample per row, with the model's batch axis of 1."""
        return [[np.asarray(self.x[k:k + 1], order="C")] for k in range(len(self.x))]

    def record(self) -> QuantizationData:
        return QuantizationData(origin=self.origin, samples=len(self.x), sha256=self.digest)


def _top1(outputs: list[list[np.ndarray]]) -> np.ndarray:
    return np.array([int(np.argmax(sample[0])) for sample in outputs])


def _digest(samples: list[list[np.ndarray]]) -> str:
    h = hashlib.sha256()
    for sample in samples:
        for array in sample:
            h.update(np.asarray(array, order="C").tobytes())
    return h.hexdigest()


@dataclass
class GateSet:
    """The inputs reduced-precision candidates are judged on, and FP32's outputs for them."""

    samples: list[list[np.ndarray]]
    labels: np.ndarray | None
    origin: str
    proof: Proof
    reference: list[list[np.ndarray]]  # ONNX Runtime's FP32 outputs
    classifier: bool  # the first output is [1, classes]: top-1 accuracy / agreement apply to it

    def __post_init__(self) -> None:
        self.digest = _digest(self.samples)
        self.reference_top1 = _top1(self.reference) if self.classifier else None
        self.reference_accuracy = (float(np.mean(self.reference_top1 == self.labels))
                                   if self.labels is not None and self.classifier else None)

    def _decided(self, outputs: list[list[np.ndarray]]) -> np.ndarray:
        """Per input: FP32's top-1 margin over its runner-up exceeds twice the payload's largest
        class-score error there (otherwise the order of the two is rounding's choice)."""
        decided = []
        for ref, got in zip(self.reference, outputs):
            scores = np.sort(np.asarray(ref[0], np.float64).ravel())
            err = float(np.max(np.abs(np.asarray(got[0], np.float64) - np.asarray(ref[0], np.float64))))
            decided.append(scores[-1] - scores[-2] > 2 * err)
        return np.array(decided, dtype=bool)

    def data(self) -> GateData:
        return GateData(origin=self.origin, samples=len(self.samples), sha256=self.digest, labelled=self.labels is not None)

    def describe(self) -> str:
        kind = {"labelled": "labelled", "unlabelled": "unlabelled real", "synthetic": "synthetic (no data given)"}[self.proof]
        return f"{len(self.samples)} {kind} inputs"

    def judge(self, name: str, precision: str, outputs: list[list[np.ndarray]], budget: Budget, rel_bound: float,
              output_names: list[str], executed: str, calibration: Dataset | None = None) -> AccuracyGate:
        """The gate record for ``outputs`` (the candidate's, one list per gate sample); raises
        UserError with both figures when the candidate is outside the budget."""
        accuracy = drop = agreement = ties = None
        if self.classifier:
            top1 = _top1(outputs)
            same = top1 == self.reference_top1
            if self.proof == "synthetic":
                # Noise inputs often sit on a trained model's decision boundaries: where FP32's own top-2
                # margin is within the payload's error, either class is FP32's answer up to rounding. Such
                # ties are counted, not held against the payload; every output's error is bounded below.
                decided = self._decided(outputs)
                ties = int(np.sum(~decided))
                agreement = float(np.mean(same[decided])) if decided.any() else 1.0
            else:
                agreement = float(np.mean(same))
            if self.labels is not None:
                accuracy = float(np.mean(top1 == self.labels))
                drop = round(100.0 * (self.reference_accuracy - accuracy), 6)
                if drop > budget.max_accuracy_drop:
                    raise UserError(
                        f"{name}: {precision.upper()} accuracy {100 * accuracy:.2f}% is {drop:.2f} points below FP32's "
                        f"{100 * self.reference_accuracy:.2f}% on {len(top1)} held-out samples, beyond --max-accuracy-drop "
                        f"{budget.max_accuracy_drop:g}; nothing was written for it"
                        + (" — calibrate on more representative data (--calib), or build FP32" if precision == "int8" else ""))
            elif agreement < budget.min_agreement:
                tied = f" ({ties} ties at FP32's own rounding margin not counted)" if ties else ""
                raise UserError(
                    f"{name}: {precision} agrees with FP32 on the top-1 class of {100 * agreement:.2f}% of "
                    f"{self.describe()}{tied}, below --min-agreement {budget.min_agreement:g}; nothing was written for it")
        # Class scores are judged by the class; other outputs (and, with no real data, every output)
        # by their error relative to their spread.
        checked = range(len(output_names)) if (self.proof == "synthetic" or not self.classifier) else range(1, len(output_names))
        worst, worst_name = None, None
        for k in range(len(output_names)):
            got = np.stack([np.asarray(s[k], np.float64) for s in outputs])
            ref = np.stack([np.asarray(s[k], np.float64) for s in self.reference])
            if not np.array_equal(np.isfinite(got), np.isfinite(ref)):
                # an overflow (inf, then NaN) where FP32 is finite: never within any budget
                raise UserError(f"{name}: {precision} output {output_names[k]!r} is not finite where FP32's is (an "
                                f"overflow of {precision}'s range) on {self.describe()}; nothing was written for it")
            if k not in checked:
                continue
            finite = np.isfinite(ref)
            spread = float(ref[finite].max() - ref[finite].min()) if finite.any() else 0.0
            err = float(np.max(np.abs(got[finite] - ref[finite]))) if finite.any() else 0.0
            rel = err / spread if spread > 0 else (0.0 if err == 0 else float("inf"))
            if worst is None or rel > worst:
                worst, worst_name = rel, output_names[k]
        if worst is not None and not worst <= rel_bound:
            raise UserError(f"{name}: {precision} output {worst_name!r} differs from FP32 by {worst:.3g} of its spread on "
                            f"{self.describe()}, beyond the target's tolerance.{precision}.rtol {rel_bound:g}; nothing was "
                            "written for it")
        return AccuracyGate(precision=precision, proof=self.proof, data=self.data(), executed=executed,
                            calibration=calibration.record() if calibration is not None else None,
                            reference_accuracy=self.reference_accuracy if accuracy is not None else None,
                            accuracy=accuracy, accuracy_drop=drop,
                            max_accuracy_drop=budget.max_accuracy_drop if accuracy is not None else None,
                            top1_agreement=agreement, ties=ties,
                            min_agreement=budget.min_agreement if (accuracy is None and agreement is not None) else None,
                            max_rel_err=None if worst is None or not np.isfinite(worst) else round(worst, 6),
                            rel_err_bound=rel_bound if worst is not None else None)


def summary(gate: AccuracyGate) -> str:
    """One line of a gate's figures, for the selection table and manifest."""
    parts = []
    if gate.accuracy is not None:
        parts.append(f"accuracy {100 * gate.accuracy:.2f}% vs FP32 {100 * gate.reference_accuracy:.2f}% "
                     f"(drop {gate.accuracy_drop:.2f} <= {gate.max_accuracy_drop:g})")
    if gate.top1_agreement is not None:
        parts.append(f"top-1 agreement {100 * gate.top1_agreement:.1f}%" + (f" ({gate.ties} ties)" if gate.ties else ""))
    if gate.max_rel_err is not None:
        parts.append(f"max err {gate.max_rel_err:.2g} of spread")
    return f"{gate.proof} gate on {gate.data.samples} inputs: " + ", ".join(parts)


def quantization_record(gate: AccuracyGate, calibration: Dataset, evaluation: GateSet, method: str) -> Quantization | None:
    """The INT8 manifest's ``quantization`` (labelled gates only, as it has always been)."""
    if gate.accuracy is None:
        return None
    return Quantization(scheme="int8", method=method, calibration=calibration.record(),
                        evaluation=QuantizationData(origin=evaluation.origin, samples=len(evaluation.samples),
                                                    sha256=evaluation.digest),
                        fp32_accuracy=gate.reference_accuracy, int8_accuracy=gate.accuracy,
                        accuracy_drop=gate.accuracy_drop, max_accuracy_drop=gate.max_accuracy_drop,
                        top1_agreement=gate.top1_agreement)


# --- the data -------------------------------------------------------------------------------------

def _read_npz(path: Path, flag: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        data = np.load(path)
        arrays = {k: data[k] for k in data.files}
    except Exception as e:
        raise UserError(f"{flag} {path} is not a readable .npz file ({first_line(e)}); save it with numpy.savez(path, {'=..., '.join(keys)}=...)") from None
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise UserError(f"{flag} {path} has no array {' or '.join(repr(k) for k in missing)} (it has {', '.join(arrays) or 'none'}); "
                        f"save it with numpy.savez(path, {'=..., '.join(keys)}=...)")
    return arrays


def _check_x(x: np.ndarray, spec: TensorSpec, flag: str, path: Path | str) -> np.ndarray:
    want = [spec.shape[1:]] if spec.shape and spec.shape[0] == 1 else []
    if len(x) < 1:
        raise UserError(f"{flag} {path}: x holds no samples; save N >= 1 samples of shape {spec.shape[1:]} and dtype {spec.dtype}")
    if x.dtype.name != spec.dtype or list(x.shape[1:]) not in want:
        raise UserError(f"{flag} {path}: x has shape {list(x.shape)} and dtype {x.dtype.name}, but the model input {spec.name!r} "
                        f"needs N samples of shape {spec.shape[1:]} and dtype {spec.dtype}, i.e. x of shape [N, {', '.join(map(str, spec.shape[1:]))}] "
                        f"{spec.dtype}")
    return np.asarray(x, order="C")


def load_calibration(path: Path, spec: TensorSpec) -> Dataset:
    x = _check_x(_read_npz(path, "--calib", ("x",))["x"], spec, "--calib", path)
    return Dataset(x=x, y=None, origin=f"file:{path}")


def load_evaluation(path: Path, spec: TensorSpec, classes: int) -> Dataset:
    arrays = _read_npz(path, "--eval", ("x", "y"))
    x = _check_x(arrays["x"], spec, "--eval", path)
    y = arrays["y"]
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or (len(y) and (y.min() < 0 or y.max() >= classes)):
        raise UserError(f"--eval {path}: y must hold one integer class label in 0..{classes - 1} per sample of x "
                        f"(shape [{len(x)}]), it has shape {list(y.shape)} and dtype {y.dtype.name}")
    if len(x) < MIN_GATE_SAMPLES:
        raise UserError(f"--eval {path} holds {len(x)} samples; the accuracy budget needs at least {MIN_GATE_SAMPLES} "
                        "labelled ones (more resolve the bound more finely: one sample in 64 is 1.6 points)")
    return Dataset(x=x, y=y.astype(np.int64), origin=f"file:{path}")


def _registered_split(source) -> tuple[np.ndarray, np.ndarray, str] | None:
    """The registered run's held-out test split (x, y), as ``edgesmith train`` stores it."""
    import mlflow

    from edgesmith.toolchain.registry import samples_origin
    from edgesmith.toolchain.train import tracking

    version = source.registry
    if version is None or version.run_id is None:
        return None
    with tempfile.TemporaryDirectory(prefix="edgesmith-gate-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=tracking.TEST_SPLIT, dst_path=tmp)
        except Exception:
            return None
        data = np.load(path)
        if "y" not in data.files:
            return None
        return data["x"], data["y"], samples_origin(version)


@dataclass
class Data:
    """What the reduced-precision candidates of one build share: INT8's calibration inputs, the
    gate sets, and why a precision is left out (``notes``, keyed by precision)."""

    budget: Budget
    calibration: Dataset | None = None
    gate: GateSet | None = None  # bf16 / fp16
    int8_gate: GateSet | None = None  # held out from calibration
    left_out: dict[str, str] = field(default_factory=dict)

    def gate_for(self, precision: str) -> GateSet | None:
        return self.int8_gate if precision == "int8" else self.gate


def _classifier(model, spec: TensorSpec) -> tuple[bool, int]:
    probe = model.run([np.zeros(spec.shape, spec.dtype)])[0]
    return (probe.ndim == 2 and probe.shape[0] == 1 and probe.shape[1] >= 2), (probe.shape[1] if probe.ndim == 2 else 0)


def _gate(model, dataset: Dataset | None, samples: list[list[np.ndarray]] | None, origin: str, proof: Proof,
          classifier: bool, reference: list[list[np.ndarray]] | None = None) -> GateSet:
    samples = dataset.samples() if dataset is not None else samples
    reference = reference if reference is not None else [model.run(s) for s in samples]
    return GateSet(samples=samples, labels=dataset.y if dataset is not None else None, origin=origin, proof=proof,
                   reference=reference, classifier=classifier)


def prepare(source, ref_samples: list[list[np.ndarray]], ref_outputs: list[list[np.ndarray]], ref_origin: str,
            calib_path: Path | None, eval_path: Path | None, budget: Budget, need_int8: bool) -> Data:
    """The gate data for ``source`` from the options and the source (see the module's docstring)."""
    from edgesmith.toolchain.reference import ReferenceModel

    data = Data(budget=budget)
    model = ReferenceModel(source.onnx_model)
    one_input = len(source.inputs) == 1
    if not one_input and (calib_path or eval_path):
        raise UserError(f"--calib and --eval take models with one input; {source.ref} has {len(source.inputs)}")
    spec = source.inputs[0]
    classifier, classes = _classifier(model, spec) if one_input else (False, 0)
    if eval_path is not None and not classifier:
        raise UserError(f"the accuracy gate's --eval needs a classifier (first output of shape [1, classes]); "
                        f"{source.ref}'s first output is not")
    calibration = load_calibration(calib_path, spec) if calib_path is not None else None
    evaluation = load_evaluation(eval_path, spec, classes) if eval_path is not None else None
    if one_input and classifier and (calibration is None or evaluation is None):
        split = _registered_split(source)
        if split is not None:
            x, y, origin = split
            x = _check_x(np.asarray(x, dtype=spec.dtype), spec, "the registered test split of", source.ref)
            # calibrate on the first third, evaluate on the rest: the gate never scores calibration inputs
            cut = min(MAX_CALIBRATION, len(x) // 3) if calibration is None else 0
            if calibration is None and cut > 0:
                calibration = Dataset(x=x[:cut], y=None, origin=f"{origin}[:{cut}]")
            if evaluation is None and len(x) - cut >= MIN_GATE_SAMPLES:
                evaluation = Dataset(x=x[cut:], y=np.asarray(y[cut:], np.int64), origin=f"{origin}[{cut}:]")

    real_samples = ref_origin.startswith("file:") and len(ref_samples) >= MIN_GATE_SAMPLES
    gate_is_calibration = False
    if evaluation is not None:
        data.gate = _gate(model, _capped(evaluation), None, _capped(evaluation).origin, "labelled", classifier)
    elif real_samples:
        data.gate = _gate(model, None, ref_samples[:MAX_GATE_SAMPLES], ref_origin, "unlabelled", classifier,
                          ref_outputs[:MAX_GATE_SAMPLES])
    elif calibration is not None and len(calibration.x) >= MIN_GATE_SAMPLES:
        pool = _capped(Dataset(calibration.x, None, calibration.origin))
        data.gate = _gate(model, pool, None, pool.origin, "unlabelled", classifier)
        gate_is_calibration = True  # fine for bf16/fp16, which do not calibrate
    else:
        # No real data: the build's own samples, topped up with seeded N(0,1) inputs to the minimum,
        # so agreement is at least measured on MIN_GATE_SAMPLES inputs (still the weaker proof).
        from edgesmith.toolchain.reference import make_samples

        extra = make_samples(source.inputs, max(0, MIN_GATE_SAMPLES - len(ref_samples)), seed=SYNTHETIC_SEED) \
            if len(ref_samples) < MIN_GATE_SAMPLES else []
        origin = f"build samples ({ref_origin}) x{len(ref_samples)}" + (f" + synthetic N(0,1) x{len(extra)}" if extra else "")
        data.gate = _gate(model, None, [*ref_samples, *extra], origin, "synthetic", classifier,
                          [*ref_outputs, *(model.run(s) for s in extra)])

    if not one_input:
        data.left_out["int8"] = (f"int8 calibrates on one-input models only, and {source.ref} has {len(source.inputs)} "
                                 "inputs; build it fp32 or bf16/fp16")
    elif calibration is None:
        data.left_out["int8"] = ("int8 needs calibration inputs: pass --calib FILE.npz (x: N samples shaped like the model "
                                 "input), or build a registered model (models:/NAME/VERSION) whose run stored its test split")
    elif data.gate.proof != "synthetic" and not gate_is_calibration:
        data.calibration, data.int8_gate = calibration, data.gate
    elif gate_is_calibration and len(calibration.x) >= 2 * MIN_GATE_SAMPLES:
        # only --calib was given: calibrate on its first half, judge on the second
        half = len(calibration.x) // 2
        data.calibration = Dataset(calibration.x[:half], None, f"{calibration.origin}[:{half}]")
        held_out = _capped(Dataset(calibration.x[half:], None, f"{calibration.origin}[{half}:]"))
        data.int8_gate = _gate(model, held_out, None, held_out.origin, "unlabelled", classifier)
    else:
        data.left_out["int8"] = (f"int8 needs held-out inputs for its accuracy gate: pass --eval FILE.npz (x and integer y, "
                                 f">= {MIN_GATE_SAMPLES} samples) or --samples with >= {MIN_GATE_SAMPLES} inputs, or --calib "
                                 f"with >= {2 * MIN_GATE_SAMPLES} (half calibrates, half is judged); --calib has "
                                 f"{len(calibration.x)}")
    if data.calibration is not None:
        if len(data.calibration.x) > MAX_CALIBRATION:
            data.calibration = Dataset(data.calibration.x[:MAX_CALIBRATION], None,
                                       f"{data.calibration.origin}[:{MAX_CALIBRATION}]")
        if calib_path is not None:  # user data: the same file given twice is a mistake to name
            _refuse_overlap(data.calibration, data.int8_gate)
    if need_int8 and "int8" in data.left_out:
        raise UserError(data.left_out["int8"])
    return data


MAX_GATE_SAMPLES = 2000  # enough to resolve 0.1 point; bounded, since emulated gates run every input under qemu
SYNTHETIC_SEED = 1234


def _capped(dataset: Dataset) -> Dataset:
    if len(dataset.x) <= MAX_GATE_SAMPLES:
        return dataset
    y = dataset.y[:MAX_GATE_SAMPLES] if dataset.y is not None else None
    return Dataset(dataset.x[:MAX_GATE_SAMPLES], y, f"{dataset.origin}[:{MAX_GATE_SAMPLES}]")


def _refuse_overlap(calibration: Dataset, gate: GateSet | None) -> None:
    """The INT8 gate must judge inputs the quantizer never saw: one sentence when they share more than
    a real data set's few exact duplicates (5% of the gate's inputs): the same data given twice."""
    if gate is None:
        return
    seen = {np.asarray(row, order="C").tobytes() for row in calibration.x}
    shared = sum(np.asarray(sample[0][0], order="C").tobytes() in seen for sample in gate.samples)
    if shared * 20 > len(gate.samples):
        raise UserError(f"{shared} of the {len(gate.samples)} inputs the int8 accuracy gate would judge ({gate.origin}) are "
                        f"also calibration inputs ({calibration.origin}); give --calib and --eval/--samples disjoint data")
