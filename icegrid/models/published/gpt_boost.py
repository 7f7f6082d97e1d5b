"""The 3rd place exactly as its author runs it (dipamc/kaggle-icecube-neutrinos@b118d6c): presets for the
published classifiers and the regression ("stack") model, routing by event length, the decoding of
classes to angles, and ``convert`` from the author's Lightning ``.ckpt`` files.

Presets (``PRESETS``):

- ``classifier_15l`` / ``classifier_18l``: one classifier (512 wide, 8 heads, neck 3072), 256 pulses,
  HLC first (``np.random.choice`` in the author's code; icegrid's seeded ``hlc_first`` draws the same way);
- ``regression``: the stack model alone (782 -> 8192 -> 2048 -> 3); it needs a classifier's outputs, so
  it converts and counts but cannot predict by itself;
- ``stacked``: a classifier plus the stack model fed its raw (pool, az logits, zn logits);
- ``routed`` / ``routed_no_stack``: the short classifier for events of at most 256 pulses, the
  long-sequence classifier (its own checkpoint, fine-tuned up to 3072 pulses, HLC first above) for
  longer ones, with and without the stack model (which takes whichever classifier saw the event, as
  the author's stack-model dataset does).

Which head predicts: without a fitted selector (an imported checkpoint has none; icegrid's own, not the
author's, is fitted with ``icegrid train --model 3rd --stage selector --checkpoint CKPT``) the direction
is the classifier's: azimuth = circular mean of softmax over the bin centres, zenith = top-3 softmax over
the padded centres clipped to [0, pi], computed in float64 from the logits. kappa is the stack model's
|xyz| when there is one, else the mean resultant length of the azimuth softmax (in [0, 1]).

``convert`` roles, by what the files hold and then by order: every file with ``inp``/``encoder`` keys is
a classifier (the first given is the short one, a second the long-sequence one), a file with
``neck.mlp``/``xyz`` keys is the stack model. Shapes fix everything but the heads; without ``--kwargs``
the published configuration the shapes identify is used (the 15- and 18-layer ones differ in depth).
``--kwargs`` takes the author's ``Model_Config`` names for the classifiers (``n_embd``, ``n_heads``,
``neck_features``, ``bias``, ``dropout``, ``neck_dropout``), optionally ``long_seq`` (the same names, for
the second classifier) and ``regression`` (``n_embd``, ``middle_features``, ``neck_features``, ``bias``,
``dropout``); a preset named in the checkpoint is then the published one of that role, resized.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import Tensor

from icegrid.kaggle import InputError
from icegrid.models.base import Batch, DirectionModel, Stage
from icegrid.models.importer import Converted, check_state_dict, expected_shapes, plain_state_dict, read_torch_file
from icegrid.models.published import gpt_boost_selector as selection
from icegrid.models.published.gpt_boost_aux import GPTAuthorsFeatures, read_aux
from icegrid.models.published.gpt_boost_layers import (Classifier, StackRegression, circular_mean_azimuth,
                                                       padded_zenith_centres, topk_zenith, xyz_to_angle)
from icegrid.models.registry import CheckpointError

SHORT_LIMIT, LONG_LIMIT = 256, 3072
CLASSIFIER_15L = {"n_embd": [512] * 15, "n_heads": [8] * 15, "neck_features": 3072, "bias": False}
CLASSIFIER_18L = {"n_embd": [512] * 18, "n_heads": [8] * 18, "neck_features": 3072, "bias": False}
REGRESSION = {"n_embd": 782, "middle_features": 8192, "neck_features": 2048, "bias": True}
_COMMON = {"arch": "authors", "transform": GPTAuthorsFeatures.name, "truncation": "hlc_first"}
PRESETS = {
    "classifier_15l": {**_COMMON, "infer_limit": SHORT_LIMIT, "classifier": CLASSIFIER_15L},
    "classifier_18l": {**_COMMON, "infer_limit": SHORT_LIMIT, "classifier": CLASSIFIER_18L},
    "regression": {**_COMMON, "infer_limit": SHORT_LIMIT, "regression": REGRESSION},
    "stacked": {**_COMMON, "infer_limit": SHORT_LIMIT, "classifier": CLASSIFIER_18L, "regression": REGRESSION},
    "routed": {**_COMMON, "infer_limit": LONG_LIMIT, "short_limit": SHORT_LIMIT, "classifier": CLASSIFIER_18L,
               "long_classifier": CLASSIFIER_18L, "regression": REGRESSION},
    "routed_no_stack": {**_COMMON, "infer_limit": LONG_LIMIT, "short_limit": SHORT_LIMIT,
                        "classifier": CLASSIFIER_18L, "long_classifier": CLASSIFIER_18L},
}
TRANSFORMS = {GPTAuthorsFeatures.name: GPTAuthorsFeatures}
CLASSIFIER_KWARGS = ("n_embd", "n_heads", "neck_features", "bias", "dropout", "neck_dropout")
REGRESSION_KWARGS = ("n_embd", "middle_features", "neck_features", "bias", "dropout")
_MODEL_CONFIG_DEFAULTS = {**CLASSIFIER_18L, "dropout": 0.0, "neck_dropout": 0.0}   # inference.py Model_Config


class GPTAuthors(DirectionModel):
    """The author's classifier(s), optionally routed by length, and optionally his stack model."""

    name = "gpt_boost"

    def __init__(self, preset: dict):
        super().__init__(preset)
        self.classifier = Classifier(preset["classifier"]) if preset.get("classifier") else None
        self.long_classifier = Classifier(preset["long_classifier"]) if preset.get("long_classifier") else None
        self.regression = StackRegression(preset["regression"]) if preset.get("regression") else None
        self.short_limit = int(preset.get("short_limit", SHORT_LIMIT))
        # Filled by load_aux from the checkpoint's angle-bins data; float32 as the author's tensors.
        self.register_buffer("azimuth_centres", torch.zeros(0), persistent=False)
        self.register_buffer("zenith_centres", torch.zeros(0), persistent=False)
        self.selector = None          # icegrid's head selector (gpt_boost_selector), fitted after import

    def load_aux(self, aux: dict) -> None:
        if "azimuth_bin_centers" not in aux:
            return
        device = next(self.parameters()).device
        self.azimuth_centres = torch.as_tensor(aux["azimuth_bin_centers"], dtype=torch.float64).float().to(device)
        padded = padded_zenith_centres(torch.as_tensor(aux["zenith_bin_centers"], dtype=torch.float64).numpy())
        self.zenith_centres = torch.from_numpy(padded).float().to(device)

    def _classify(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        if self.classifier is None:
            raise CheckpointError("gpt_boost: the regression (stack) model alone takes a classifier's pool and "
                                  "logits; import it together with a classifier (--from CLASSIFIER --from STACK)")
        x, mask, length = batch["x"], batch["mask"], batch["length"]
        long = length > self.short_limit
        if self.long_classifier is None or not bool(long.any()):
            return self.classifier(x, mask, length)
        if bool(long.all()):
            return self.long_classifier(x, mask, length)
        outputs = []
        for rows, net in ((~long, self.classifier), (long, self.long_classifier)):
            cut = int(length[rows].max())          # the author cuts each batch to its longest event
            outputs.append((rows, net(x[rows, :cut], mask[rows, :cut], length[rows])))
        merged = []
        for part in range(3):
            like = outputs[0][1][part]
            out = like.new_empty((x.shape[0], like.shape[1]))
            for rows, values in outputs:
                out[rows] = values[part].to(out.dtype)
            merged.append(out)
        return merged[0], merged[1], merged[2]

    def raw_outputs(self, batch: Batch) -> dict[str, Tensor]:
        """The author's outputs, named as the goldens' columns (az_logit/zn_logit/pool are (B, n) blocks)."""
        az_logits, zn_logits, pool = self._classify(batch)
        if self.azimuth_centres.numel() == 0:
            raise CheckpointError("gpt_boost: no angle bins in this model; import the weights with "
                                  "--aux angle_bins_128.json")
        az32, zn32 = self.azimuth_centres, self.zenith_centres
        out = {"az_logit": az_logits, "zn_logit": zn_logits, "pool": pool,
               "azimuth": circular_mean_azimuth(az_logits, az32), "zenith_raw": topk_zenith(zn_logits, zn32),
               "azimuth_f64": circular_mean_azimuth(az_logits, az32.double()),
               "zenith_raw_f64": topk_zenith(zn_logits, zn32.double())}
        out["zenith"] = out["zenith_raw"].clamp(0.0, math.pi)
        if self.regression is not None:
            xyz = self.regression(torch.cat([pool, az_logits, zn_logits], dim=1))
            reg_azimuth, reg_zenith = xyz_to_angle(xyz.double())
            out.update({"reg_x": xyz[:, 0], "reg_y": xyz[:, 1], "reg_z": xyz[:, 2], "reg_kappa": xyz.norm(dim=1),
                        "reg_azimuth": reg_azimuth, "reg_zenith": reg_zenith})
        return out

    def predict(self, batch: Batch) -> tuple[Tensor, Tensor]:
        out = self.raw_outputs(batch)
        azimuth, zenith = out["azimuth_f64"], out["zenith_raw_f64"].clamp(0.0, math.pi)
        if self.selector is not None and "reg_kappa" in out:
            engineered = batch["engineered"].double().cpu().numpy()
            pick = torch.from_numpy(selection.use_regression(self.selector, engineered, selection.heads(out)))
            pick = pick.to(azimuth.device)
            azimuth = torch.where(pick, out["reg_azimuth"], azimuth)
            zenith = torch.where(pick, out["reg_zenith"], zenith)
        direction = torch.stack([azimuth.cos() * zenith.sin(), azimuth.sin() * zenith.sin(), zenith.cos()], dim=1)
        if "reg_kappa" in out:
            kappa = out["reg_kappa"].float()
        else:
            p = torch.softmax(out["az_logit"].double(), dim=1)
            centres = self.azimuth_centres.double()
            kappa = torch.hypot(p @ centres.cos(), p @ centres.sin()).float()
        return direction, kappa

    def stages(self, training: dict) -> list[Stage]:
        """Only icegrid's selector, fitted on top of imported weights (``--stage selector --checkpoint``)."""
        if self.regression is None or self.classifier is None:
            raise ValueError("gpt_boost: the selector picks between the classifier and the stack model; "
                             "import both (--from CLASSIFIER [--from LONG_SEQ] --from STACK)")
        return [Stage("selector", "fit", fit=self._fit_selector)]

    def _fit_selector(self, batches) -> dict:
        self.selector, metrics = selection.fit(self.raw_outputs, batches)
        return metrics

    def extra_state_for_checkpoint(self) -> dict:
        return {"selector": selection.to_blob(self.selector)}

    def load_extra_state(self, extra: dict) -> None:
        self.selector = selection.from_blob(extra.get("selector"))


def build(preset_config: dict) -> GPTAuthors:
    return GPTAuthors(preset_config)


# ---- convert -------------------------------------------------------------------------------------------
def _role_of(state_dict: dict, path: Path) -> str:
    keys = list(state_dict)
    if any(k == "inp.weight" or k.startswith("encoder.attn.") for k in keys):
        return "classifier"
    if any(k.startswith(("neck.mlp.", "xyz.")) for k in keys):
        return "regression"
    raise CheckpointError(f"{path}: not a 3rd-place classifier or stack model (first key '{keys[0]}')")


def _shapes(state_dict: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def _model_shapes(config: dict, kind: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return expected_shapes(Classifier(config) if kind == "classifier" else StackRegression(config))


def _inferred_classifier(state_dict: dict) -> dict | None:
    """The classifier config the shapes spell out (heads set to 1: shapes do not carry them), or None."""
    try:
        n_layers = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.attn."))
        n_embd = [int(state_dict[f"encoder.attn.{i}.ln_2.weight"].shape[0]) for i in range(n_layers)]
        config = {"n_embd": n_embd, "n_heads": [1] * n_layers,
                  "neck_features": int(state_dict["neck_az.mlp.3.weight"].shape[0]),
                  "bias": "encoder.attn.0.attn.c_attn.bias" in state_dict,
                  "num_classes": int(state_dict["azimuth.weight"].shape[0])}
        return config if _model_shapes(config, "classifier") == _shapes(state_dict) else None
    except (KeyError, ValueError, IndexError):
        return None


def _published_classifier(state_dict: dict, path: Path) -> tuple[str, dict]:
    published = {"classifier_15l": CLASSIFIER_15L, "classifier_18l": CLASSIFIER_18L}
    got = _shapes(state_dict)
    expected = {name: _model_shapes(config, "classifier") for name, config in published.items()}
    matches = [name for name, shapes in expected.items() if shapes == got]
    if len(matches) == 1:
        return matches[0], dict(published[matches[0]])
    if len(matches) > 1:
        raise CheckpointError(f"{path}: shapes fit several published classifiers ({', '.join(matches)}); "
                              f"pick one with --kwargs")
    inferred = _inferred_classifier(state_dict)
    if inferred is not None:
        raise CheckpointError(
            f"{path}: a {len(inferred['n_embd'])}-layer classifier of width {inferred['n_embd'][0]} (neck "
            f"{inferred['neck_features']}) is no published configuration; give its n_embd/n_heads/neck_features/bias "
            f"with --kwargs")
    # Broken file: name its first offending key against the published config it is closest to.
    closest = max(expected, key=lambda n: sum(got.get(k) == s for k, s in expected[n].items()))
    check_state_dict(state_dict, expected[closest], path, f"3rd-place preset '{closest}'")
    raise AssertionError("unreachable: shapes differ but no key mismatched")


def _classifier_config(state_dict: dict, path: Path, kwargs: dict | None) -> tuple[str | None, dict]:
    """(published preset name or None, the author's Model_Config values) for one classifier file."""
    if kwargs is None:
        return _published_classifier(state_dict, path)
    config = {**_MODEL_CONFIG_DEFAULTS, **kwargs}
    if "azimuth.weight" in state_dict:
        config["num_classes"] = int(state_dict["azimuth.weight"].shape[0])
    try:
        shapes = _model_shapes(config, "classifier")
    except (ValueError, TypeError) as err:
        raise InputError(f"--kwargs: {err}") from None
    check_state_dict(state_dict, shapes, path, f"3rd-place classifier {_describe(config)}")
    same = {k: config[k] for k in CLASSIFIER_15L}
    name = next((n for n, c in (("classifier_15l", CLASSIFIER_15L), ("classifier_18l", CLASSIFIER_18L))
                 if c == same and config.get("num_classes", 128) == 128), None)
    return name, config


def _regression_config(state_dict: dict, path: Path, kwargs: dict | None) -> dict:
    config = dict(REGRESSION)
    if kwargs is not None:
        config.update(kwargs)
    elif "neck.mlp.0.weight" in state_dict and "neck.mlp.4.weight" in state_dict:
        first, second = state_dict["neck.mlp.0.weight"].shape, state_dict["neck.mlp.4.weight"].shape
        config = {"n_embd": int(first[1]), "middle_features": int(first[0]), "neck_features": int(second[0]),
                  "bias": "neck.mlp.0.bias" in state_dict}
    try:
        shapes = _model_shapes(config, "regression")
    except (ValueError, TypeError, KeyError) as err:
        raise InputError(f"--kwargs regression: {err}") from None
    check_state_dict(state_dict, shapes, path, f"3rd-place stack model {config['n_embd']} -> "
                                               f"{config['middle_features']} -> {config['neck_features']}")
    return config


def _describe(config: dict) -> str:
    return f"({len(config['n_embd'])} layers of {config['n_embd'][0]}, neck {config['neck_features']})"


def _split_kwargs(kwargs: dict | None) -> tuple[dict | None, dict | None, dict | None]:
    """(classifier, long-sequence classifier, regression) kwargs; one-line InputError on an unknown name."""
    if kwargs is None:
        return None, None, None
    for key in kwargs:
        if key not in (*CLASSIFIER_KWARGS, "long_seq", "regression"):
            raise InputError(f"--kwargs: unknown key '{key}' (the 3rd place takes {', '.join(CLASSIFIER_KWARGS)}, "
                             f"long_seq, regression)")
    for what, sub, allowed in (("long_seq", kwargs.get("long_seq"), CLASSIFIER_KWARGS),
                               ("regression", kwargs.get("regression"), REGRESSION_KWARGS)):
        if sub is not None and (not isinstance(sub, dict) or any(k not in allowed for k in sub)):
            raise InputError(f"--kwargs {what}: must be an object of {', '.join(allowed)}")
    short = {k: v for k, v in kwargs.items() if k in CLASSIFIER_KWARGS} or None
    long = {**(short or {}), **kwargs["long_seq"]} if "long_seq" in kwargs else short
    return short, long, kwargs.get("regression")


def _preset_name(names: list[str | None], has_regression: bool) -> str:
    if not names:
        return "regression"
    if len(names) == 2:
        return "routed" if has_regression else "routed_no_stack"
    if has_regression:
        return "stacked"
    return names[0] or "classifier_18l"


def convert(sources: list[Path], kwargs: dict | None, aux: dict[str, Path]) -> Converted:
    """The author's ``.ckpt`` files -> icegrid keys (``classifier.``, ``long_classifier.``, ``regression.``)."""
    classifiers, regression = [], None
    for path in sources:
        # inference.py strips 'model.' wherever present; anything else stays and is reported as unexpected.
        raw = plain_state_dict(read_torch_file(path), path)
        state_dict = {k[len("model."):] if k.startswith("model.") else k: v for k, v in raw.items()}
        if _role_of(state_dict, path) == "classifier":
            classifiers.append((path, state_dict))
        elif regression is None:
            regression = (path, state_dict)
        else:
            raise CheckpointError(f"{path}: a second stack model (the first is {regression[0].name})")
    if len(classifiers) > 2:
        raise CheckpointError(f"{classifiers[2][0]}: a third classifier (the 3rd place routes one short "
                              f"and one long-sequence classifier)")
    role_kwargs = _split_kwargs(kwargs)
    for key, needs, present in (("long_seq", "a second classifier", len(classifiers) == 2),
                                ("regression", "a stack model", regression is not None)):
        if kwargs and key in kwargs and not present:
            raise InputError(f"--kwargs {key}: given, but no {needs} among the --from files")
    names, preset_roles, state = [], {}, {}
    for role, (path, sd), role_kw in zip(("classifier", "long_classifier"), classifiers, role_kwargs):
        name, config = _classifier_config(sd, path, role_kw)
        names.append(name)
        preset_roles[role] = config
        state.update({f"{role}.{k}": v for k, v in sd.items()})
    if regression is not None:
        path, sd = regression
        preset_roles["regression"] = _regression_config(sd, path, role_kwargs[2])
        state.update({f"regression.{k}": v for k, v in sd.items()})
    _check_roles_fit(preset_roles, classifiers, regression)
    preset = _preset_name(names, regression is not None)
    preset_config = copy.deepcopy(PRESETS[preset])
    for role in ("classifier", "long_classifier", "regression"):
        preset_config.pop(role, None)
    preset_config.update(preset_roles)
    side = {"stack_model_only": True}     # no classifier: no bins or sensor table to take, nothing to predict
    if classifiers:
        side = read_aux(aux, int(preset_roles["classifier"].get("num_classes", 128)), "gpt_boost")
    return Converted(preset=preset, preset_config=preset_config, state_dict=state, aux=side,
                     kwargs=copy.deepcopy(preset_roles))


def _check_roles_fit(roles: dict, classifiers: list, regression: tuple | None) -> None:
    """The long classifier must give the short one's outputs; the stack model takes (pool, logits)."""
    shapes = [(c.get("num_classes", 128), c["n_embd"][-1]) for r, c in roles.items() if r != "regression"]
    if len(shapes) == 2 and shapes[0] != shapes[1]:
        raise CheckpointError(f"{classifiers[1][0]}: long-sequence classifier gives {shapes[1][0]} bins and a "
                              f"{shapes[1][1]}-wide pool, the short one {shapes[0][0]} and {shapes[0][1]}")
    if regression is not None and shapes:
        bins, width = shapes[0]
        needed = width + bins + bins + 14
        if roles["regression"]["n_embd"] != needed:
            raise CheckpointError(f"{regression[0]}: the stack model takes {roles['regression']['n_embd']} inputs, "
                                  f"the classifier gives {width} + {bins} + {bins + 14} = {needed}")
