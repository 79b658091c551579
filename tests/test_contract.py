"""The device contract (runtime/contract.py): the shared example cases (tests/data/contract/cases.json,
also run by GoogleTest in tests/cpp/test_contract.cc), and the freshness of everything generated from it
(docs/telemetry.schema.json, docs/desired.schema.json, csrc/common/contract_words.h)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from pydantic import ValidationError

from edgesmith.runtime import contract

REPO = Path(__file__).resolve().parents[1]
CASES = json.loads((REPO / "tests" / "data" / "contract" / "cases.json").read_text())["cases"]


def _validate(case: dict) -> None:
    if case["schema"] == "device":
        contract.parse_message(json.dumps(case["message"]).encode())
    elif case["schema"] == "shadow_state":
        contract.ShadowState.model_validate_json(json.dumps(case["message"]))
    elif case["schema"] == "capture_state":
        contract.CaptureState.model_validate_json(json.dumps(case["message"]))
    elif case["schema"] == "capture_record":
        contract.CaptureRecord.model_validate_json(json.dumps(case["message"]))
    else:
        contract.DesiredState.model_validate_json(json.dumps(case["message"]))


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_example_case(case: dict) -> None:
    if case["valid"]:
        _validate(case)
    else:
        with pytest.raises(ValidationError):
            _validate(case)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_generated_schema_agrees_with_the_models(case: dict) -> None:
    # The JSON Schema cannot say everything the models check (ascending edges, a reference of the
    # right length, unique names, a deploy event's details): only the valid cases must agree.
    which = {"device": "telemetry", "capture_record": "capture"}.get(case["schema"], "desired")
    schema = contract.json_schema(which)
    if which == "desired":
        state = {"shadow_state": "ShadowState", "capture_state": "CaptureState"}.get(case["schema"], "DesiredState")
        schema = {**schema["$defs"][state], "$defs": schema["$defs"]}
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(case["message"]))
    if case["valid"]:
        assert not errors, errors[0].message


def test_cases_cover_every_kind_and_the_issue_poison() -> None:
    valid_kinds = {c["message"].get("kind") for c in CASES if c["valid"] and c["schema"] == "device"}
    assert valid_kinds == {k.value for k in contract.MessageKind}
    names = {c["name"] for c in CASES if not c["valid"]}
    assert {"histogram without edges", "huge classes", "count 2^63", "desired_version 2^63-1",
            "device id with a trailing newline"} <= names


@pytest.mark.parametrize("which", sorted(contract.SCHEMAS))
def test_committed_schema_is_current(which: str) -> None:
    path = REPO / contract.SCHEMAS[which]
    want = json.dumps(contract.json_schema(which), indent=2, sort_keys=True) + "\n"
    assert path.read_text() == want, (f"{contract.SCHEMAS[which]} is stale; regenerate it: "
                                      f"python -m edgesmith.runtime.contract --schema {which} > {contract.SCHEMAS[which]}")
    jsonschema.Draft202012Validator.check_schema(json.loads(path.read_text()))


def test_committed_header_is_current() -> None:
    result = subprocess.run([sys.executable, "-m", "edgesmith.runtime.contract", "--header"],
                            capture_output=True, text=True, check=True, timeout=120)
    assert (REPO / contract.HEADER).read_text() == result.stdout, (
        f"{contract.HEADER} is stale; regenerate it: python -m edgesmith.runtime.contract --header > {contract.HEADER}")


def test_ids_are_matched_whole() -> None:
    assert contract.is_id("cam-01") and not contract.is_id("cam-01\n") and not contract.is_id("_monitor")
    from edgesmith.toolchain.fleet import protocol
    assert protocol.parse_topic("edgesmith/v1/lab/cam-01/birth") == ("lab", "cam-01", "birth")
    assert protocol.parse_topic("edgesmith/v1/lab/cam-01\n/birth") is None
    assert protocol.parse_topic("edgesmith/v1/lab/cam-01/birth\n")[2] not in protocol.DEVICE_KINDS


def test_oversized_payload_is_refused_before_parsing() -> None:
    with pytest.raises(contract.PayloadTooLarge):
        contract.parse_message(b" " * (contract.MAX_PAYLOAD_BYTES + 1))


def test_desired_state_from_the_deploy_code_is_in_the_contract() -> None:
    from edgesmith.toolchain.deploy import desired
    from edgesmith.toolchain.deploy.archive import ArchiveInfo

    info = ArchiveInfo(sha256="d" * 64, size=10, path="x.tar", name="a", manifest_sha256="a" * 64, model="m",
                       model_version="1", target="host", backend="ort")
    state = desired.desired_state("lab", "cam-01", 3, "dep-1", "deploy", info, "http://127.0.0.1:1")
    contract.DesiredState.model_validate_json(json.dumps(state))
