"""Site folder, privacy ledger and egress guard."""

import hashlib
import json

import numpy as np
import pytest

from compliance import AuditLog, verify_log
from compliance.keys import read_vkey_file
from fedsilo.errors import ConfigError, RefusalError
from pipelines.compression import payload_layout
from pipelines.training import composed_epsilon
from silo_agent.egress import check_arrays, check_metrics, check_reply
from silo_agent.ledger import PrivacyLedger, Spend
from silo_agent.site import Site, init_site, register_dataset
from tiny_data import write_tiny_datalist


def test_site_init_register_and_reopen(tmp_path):
    site = init_site(tmp_path / "s", "hospital0")
    datalist = write_tiny_datalist(tmp_path / "data")
    site = register_dataset(site, "ct", task="seg3d", datalist=datalist)
    again = Site.open(tmp_path / "s")
    assert again.site_id == "hospital0" and again.dataset("ct").datalist == datalist.resolve()
    with pytest.raises(ConfigError, match="no dataset 'mr'.*registered: ct"):
        again.dataset("mr")


def test_site_creation_and_dataset_registration_are_audited_without_paths(tmp_path):
    site = init_site(tmp_path / "s", "hospital0")
    datalist = write_tiny_datalist(tmp_path / "Doe_John_studies")  # hospital folders can name patients
    register_dataset(site, "ct", task="seg3d", datalist=datalist)
    register_dataset(site, "ct", task="seg3d", datalist=datalist)
    verify_log(site.audit_dir)
    with AuditLog.open(site.audit_dir, read_only=True) as log:
        records = list(log.records())
        leaves = b"".join(leaf for _, leaf, _ in log.rows())
    assert [r["event"] for r in records] == ["config.changed", "policy.changed", "dataset.registered", "dataset.registered"]
    assert all(r["actor"]["kind"] == "person" and r["actor"]["role"] == "hospital-it" for r in records)
    assert all(r["source"].startswith("silo-cli@") for r in records)
    registered = records[2]
    assert registered["object"] == {"type": "dataset", "id": "ct", "sha256": hashlib.sha256(datalist.read_bytes()).hexdigest()}
    assert [r["details"]["replaced"] for r in records[2:]] == [False, True]
    assert b"Doe_John" not in leaves


def test_the_silo_actor_names_its_witness_key(tmp_path):
    site = init_site(tmp_path / "s", "hospital0")
    actor = site.actor()
    vkey = read_vkey_file(tmp_path / "s" / "keys" / "hospital0-witness.vkey")
    assert actor == {"kind": "silo", "id": "hospital0", "site": "hospital0", "role": "silo-agent", "key": vkey.fingerprint}
    assert vkey.fingerprint == "ed25519:" + hashlib.sha256(vkey.public_key).hexdigest()


@pytest.mark.parametrize("name", ["Hospital 0", "../x", ""])
def test_bad_site_names_refused(tmp_path, name):
    with pytest.raises(ConfigError):
        init_site(tmp_path / "s", name)


def test_missing_site_folder_says_how_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="no site folder.*fedsilo silo init"):
        Site.open(tmp_path / "nowhere")


def test_site_folder_of_another_site_is_not_taken_over(tmp_path):
    init_site(tmp_path / "s", "hospital0")
    with pytest.raises(ConfigError, match="already belongs to site hospital0"):
        init_site(tmp_path / "s", "hospital1")


def spend(round_: int, nm: float = 1.1) -> Spend:
    return Spend(dataset="ct", run_id="r1", round=round_, plan_hash="p" * 64, accountant="rdp", noise_multiplier=nm,
                 sample_rate=0.1, steps=40, delta=1e-5, epsilon_after=0.0, history=((nm, 0.1, 40),))


def test_ledger_is_durable_and_composes(tmp_path):
    with PrivacyLedger.for_site(tmp_path) as ledger:
        ledger.record(spend(1))
        ledger.record(spend(2))
        assert ledger.has_spent("ct", "r1", 2) and not ledger.has_spent("ct", "r1", 3)
    with PrivacyLedger.for_site(tmp_path) as reopened:  # as after a silo restart
        history = reopened.history("ct")
    assert history == [(1.1, 0.1, 40), (1.1, 0.1, 40)]
    one = composed_epsilon(history[:1], delta=1e-5, accountant="rdp")
    two = composed_epsilon(history, delta=1e-5, accountant="rdp")
    assert one < two < 2 * one  # RDP composition is tighter than adding epsilons


def test_ledger_refuses_the_same_round_twice(tmp_path):
    import sqlite3

    with PrivacyLedger.for_site(tmp_path) as ledger:
        ledger.record(spend(1))
        with pytest.raises(sqlite3.IntegrityError):
            ledger.record(spend(1))


def test_egress_allows_only_the_models_tensors_and_listed_metrics():
    ref = {"w": np.zeros((2, 2), np.float32)}
    check_arrays({"w": np.ones((2, 2), np.float32)}, ref)
    check_metrics({"num-examples": 10, "epsilon": 1.5})
    for bad in ({"w": np.ones((3,), np.float32)}, {"w": np.ones((2, 2), np.float64)}, {"w": np.full((2, 2), np.nan, np.float32)},
                {"w": np.ones((2, 2), np.float32), "extra": np.ones(1, np.float32)}):
        with pytest.raises(RefusalError, match="egress blocked"):
            check_arrays(bad, ref)
    for bad in ({"patient-name": 1.0}, {"dice": float("inf")}, {"dice": "0.9"}):
        with pytest.raises(RefusalError, match="egress blocked"):
            check_metrics(bad)


def _reply(**extra):
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from fedsilo import protocol as P
    from fedsilo.wire import pack

    content = RecordDict({
        P.ARRAYS: pack({"w": np.zeros((2, 2), np.float32)}),
        P.METRICS: MetricRecord({"num-examples": 4, "dice": 0.5}),
        P.IDENTITY: ConfigRecord({P.SITE: "hospital0", P.RUN_ID: "r1", P.ROUND: 2}),
    })
    for key, value in extra.items():
        content[key] = value
    return content


def _packed(arrays: dict, metadata: dict | None = None):
    """A packed record built by hand (safetensors with optional metadata, which fedsilo.wire.pack never writes)."""
    from flwr.app import Array, ArrayRecord
    from safetensors.numpy import save

    from fedsilo.wire import PACKED_KEY, STYPE

    blob = save(arrays, metadata=metadata)
    return ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(blob),), stype=STYPE, data=blob)})


def _forged(header: str | None, shape: tuple | None = None):
    """A packed record around a hand-written header (None: fedsilo.wire.pack's own) for the zero 2x2 tensor."""
    import struct

    from flwr.app import Array, ArrayRecord
    from safetensors.numpy import save

    from fedsilo.wire import PACKED_KEY, STYPE

    blob = save({"w": np.zeros((2, 2), np.float32)})
    if header is not None:
        blob = struct.pack("<Q", len(header)) + header.encode() + bytes(16)
    return ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=shape or (len(blob),), stype=STYPE, data=blob)})


REF = {"w": np.zeros((2, 2), np.float32)}
LAYOUT = payload_layout(REF, "float32")
ALL = ("loss", "dice", "accuracy", "auc")


def test_the_records_a_reply_may_carry_are_the_protocols_names():
    from fedsilo import protocol as P
    from silo_agent.egress import REPLY_RECORDS

    assert REPLY_RECORDS == {P.ARRAYS, P.METRICS, P.IDENTITY, P.WITNESS, P.EVALUATION}


def test_the_whole_reply_passes_the_egress_guard():
    check_reply(_reply(), site_id="hospital0", run_id="r1", round_=2, allowed_metrics=ALL, layout=LAYOUT)


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.__setitem__("notes", __import__("flwr.app", fromlist=["ConfigRecord"]).ConfigRecord({"x": "DOE^JANE"})), "unexpected records"),
    (lambda c: c["identity"].__setitem__("patient", "DOE^JANE"), "identity record holds"),
    (lambda c: c["identity"].__setitem__("site", "hospital9"), "identity record holds"),
    (lambda c: c["identity"].__setitem__("run-id", "r0"), "identity record holds"),
    (lambda c: c["metrics"].__setitem__("patient-age", 54.0), "metric 'patient-age' is not on the allow-list"),
    # the evaluation a train reply carries: the same rules as its metrics
    (lambda c: c.__setitem__("evaluation", __import__("flwr.app", fromlist=["MetricRecord"]).MetricRecord({"patient-age": 54.0})),
     "metric 'patient-age' is not on the allow-list"),
    (lambda c: c.__setitem__("evaluation", __import__("flwr.app", fromlist=["ConfigRecord"]).ConfigRecord({"dice": "DOE^JANE"})),
     "not a finite number"),
    (lambda c: c.__setitem__("arrays", _packed({"w": np.zeros((2, 2), np.float32), "extra": np.zeros(1, np.float32)})), "tensors differ"),
    (lambda c: c.__setitem__("arrays", _packed({"w": np.zeros((2, 2), np.float64)})), "tensor 'w' is float64"),
    (lambda c: c.__setitem__("arrays", _packed({"w": np.zeros((2, 2), np.float32)}, metadata={"patient": "DOE^JANE"})), "carry metadata"),
    (lambda c: c["arrays"].__setitem__("extra", __import__("flwr.app", fromlist=["Array"]).Array(np.zeros(1, np.float32))), "not packed"),
    # free text in the blob's header beside a valid tensor: a repeated name, padding, the Array's own shape field
    (lambda c: c.__setitem__("arrays", _forged('{"w": "DOE^JANE 1970-01-01", "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}')),
     "repeats a name"),
    (lambda c: c.__setitem__("arrays", _forged('{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}' + " \t" * 40)),
     "not in fedsilo's encoding"),
    (lambda c: c.__setitem__("arrays", _forged(None, shape=tuple(map(ord, "DOE^JANE")))), "shape is not its byte count"),
])
def test_anything_else_is_blocked(mutate, message):
    content = _reply()
    mutate(content)
    with pytest.raises(RefusalError, match=message):
        check_reply(content, site_id="hospital0", run_id="r1", round_=2, allowed_metrics=ALL, layout=LAYOUT)


def test_the_site_policy_decides_which_metrics_leave():
    with pytest.raises(RefusalError, match="the site policy does not let dice leave"):
        check_reply(_reply(), site_id="hospital0", run_id="r1", round_=2, allowed_metrics=("loss",), layout=LAYOUT)


def test_the_site_policy_also_decides_which_evaluation_metrics_leave_with_an_update():
    from flwr.app import MetricRecord

    content = _reply()
    del content["metrics"]["dice"]
    content["evaluation"] = MetricRecord({"dice": 0.8, "num-examples": 4})
    check_reply(content, site_id="hospital0", run_id="r1", round_=2, allowed_metrics=ALL, layout=LAYOUT)
    with pytest.raises(RefusalError, match="the site policy does not let dice leave"):
        check_reply(content, site_id="hospital0", run_id="r1", round_=2, allowed_metrics=("loss",), layout=LAYOUT)
