"""The training config: one TOML file, validated by pydantic, unknown keys refused by name.

Its hash (of the validated values, not the file's bytes) names the Optuna study and tags the
registered model version, so the same training setup is recognisable wherever it shows up.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import tomllib
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgesmith.toolchain.errors import UserError

PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(gt=0, lt=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetConfig(_Strict):
    source: str = Field(description="`sklearn:digits`, a .npz file with arrays x and y, or an image folder (one sub-folder per class)")
    normalise: Literal["standardise", "none"] = Field(
        "standardise", description="subtract the training split's mean and divide by its standard deviation")


class SplitConfig(_Strict):
    test: Fraction = 0.2
    val: Fraction = 0.1


class EarlyStopping(_Strict):
    patience: PositiveInt = 5
    min_delta: Annotated[float, Field(ge=0)] = 0.0


class SearchParam(_Strict):
    """One dimension of the search space: a range (``low``, ``high``; integers if both are, and
    ``log`` for a log scale) or a list of ``choices``."""

    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    choices: list[Union[str, int, float]] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_kind(self) -> SearchParam:
        has_range = self.low is not None or self.high is not None
        if has_range == (self.choices is not None):
            raise ValueError("give either low and high, or choices")
        if has_range and (self.low is None or self.high is None or not self.low < self.high):
            raise ValueError("a range needs low below high")
        if self.log and has_range and self.low <= 0:
            raise ValueError("a log range needs low above 0")
        return self

    @property
    def kind(self) -> Literal["choices", "int", "float"]:
        if self.choices is not None:
            return "choices"
        return "int" if isinstance(self.low, int) and isinstance(self.high, int) else "float"


SEARCHABLE = ("lr", "weight_decay", "batch_size", "optimiser", "epochs")


class TrainConfig(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")] = Field(description="registered model name")
    model: str = Field(description="`package.module:callable` returning an nn.Module")
    input_shape: list[PositiveInt] = Field(min_length=2, description="one input's static shape, batch first: [1, 1, 8, 8]")
    dataset: DatasetConfig
    split: SplitConfig = SplitConfig()
    seed: int = 0
    threads: PositiveInt = Field(2, description="torch intra-op threads (fixed, so results repeat)")
    optimiser: Literal["adam", "adamw", "sgd"] = "adam"
    lr: Annotated[float, Field(gt=0)] = 3e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    epochs: PositiveInt = 20
    batch_size: PositiveInt = 64
    early_stopping: EarlyStopping | None = EarlyStopping()
    experiment: str = Field("edgesmith", description="MLflow experiment name")
    search: dict[str, SearchParam] = Field(default_factory=dict, description="Optuna search space: parameter -> range or choices")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.split.test + self.split.val >= 0.9:
            raise ValueError("split.test + split.val must leave at least 10% of the data for training")
        unknown = set(self.search) - set(SEARCHABLE)
        if unknown:
            raise ValueError(f"search cannot vary {', '.join(sorted(unknown))}; searchable: {', '.join(SEARCHABLE)}")
        for key, param in self.search.items():
            self._check_search_param(key, param)
        return self

    def _check_search_param(self, key: str, param: SearchParam) -> None:
        """Every value a trial can draw must pass the override path a trial takes (``with_overrides``),
        so a bad space is refused when the config loads, not by the first trial mid-search."""
        annotation = TrainConfig.model_fields[key].annotation
        if param.kind == "float" and annotation is int:
            raise ValueError(f"search.{key}: {key} is an integer, so its range needs integer low and high "
                             f"(got {param.low} and {param.high})")
        values = param.choices if param.kind == "choices" else [param.low, param.high]
        base = {**self.model_dump(), "search": {}}
        for value in values:
            try:
                TrainConfig.model_validate({**base, key: value})
            except ValidationError as e:
                what = "choice" if param.kind == "choices" else ("low" if value == param.low else "high")
                raise ValueError(f"search.{key}: {what} {value!r} is not a valid {key} "
                                 f"({e.errors()[0]['msg'].removeprefix('Value error, ')})") from None

    def digest(self) -> str:
        """sha256 of the validated config (canonical JSON): same setup, same hash."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def with_overrides(self, **values) -> TrainConfig:
        return TrainConfig.model_validate({**self.model_dump(), **{k: v for k, v in values.items() if v is not None}})


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The valid keys of the table at ``loc`` (a pydantic error location)."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            break
        candidates = [field.annotation, *getattr(field.annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            break
        model = nested[0]
    return list(model.model_fields)


def _explain(error: ValidationError, path: Path) -> str:
    first = error.errors()[0]
    loc = tuple(first["loc"])
    where = ".".join(str(p) for p in loc)
    if first["type"] == "extra_forbidden":
        valid = _fields_at(TrainConfig, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{path}: unknown key {where!r}{hint}; valid keys here are: {', '.join(valid)}"
    if first["type"] == "missing":
        return f"{path}: required key {where!r} is missing"
    message = first["msg"].removeprefix("Value error, ")
    return f"{path}: {where + ': ' if where else ''}{message}"


def load_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"config {path} is a directory; pass a TOML file (e.g. examples/digits.toml)") from None
    except OSError as e:
        raise UserError(f"config file {path} cannot be read ({e.strerror or type(e).__name__})") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not text (not UTF-8); pass a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML ({e})") from None
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(_explain(e, path)) from None
