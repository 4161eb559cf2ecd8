"""Names on the wire between coordinator and silos (Flower RecordDict keys).

Constants only, so both sides agree without importing each other.
"""

ARRAYS = "arrays"  # ArrayRecord: global weights (to silos) or the weight delta (from silos)
CONFIG = "config"  # ConfigRecord to silos: PLAN_YAML, PLAN_HASH, RUN_ID, ROUND
METRICS = "metrics"  # MetricRecord from silos: numeric, allow-listed keys only
IDENTITY = "identity"  # ConfigRecord from silos: SITE, and in train replies RUN_ID and ROUND
WITNESS = "witness"  # ConfigRecord to silos: CHECKPOINT, PROOF, OLD_SIZE; from silos: COSIGNED
EVALUATE = "evaluate"  # ConfigRecord in a train message: ROUND, the round whose model (the one carried) to evaluate first
EVALUATION = "evaluation"  # MetricRecord in a train reply: that evaluation's metrics (numeric, allow-listed keys only)
# A plain round's whole content, sealed into one ConfigRecord holding one bytes value (fedsilo.envelope), both ways.
ENVELOPE = "envelope"
# The records each direction carries and the kind of each (Flower's protobuf field names): what a receiver opens from
# an envelope (fedsilo.envelope), and what a silo's egress guard lets leave (silo_agent.egress).
RECORDS_TO_SILO = {ARRAYS: "array_record", CONFIG: "config_record", EVALUATE: "config_record", WITNESS: "config_record"}
RECORDS_FROM_SILO = {ARRAYS: "array_record", METRICS: "metric_record", IDENTITY: "config_record",
                     EVALUATION: "metric_record", WITNESS: "config_record"}

PLAN_YAML = "plan-yaml"
PLAN_HASH = "plan-hash"
SUBMISSION = "submission"  # the researcher's signed plan submission (a compliance.statements note), bytes
RESEARCHER_KEY = "researcher-key"  # the researcher's public key (.vkey line) that signed the submission
RUN_ID = "run-id"
ROUND = "round"
SITE = "site"
CHECKPOINT = "checkpoint"  # a signed checkpoint note (bytes, C2SP tlog-checkpoint)
PROOF = "proof"  # RFC 9162 consistency proof: list of 32-byte hashes
OLD_SIZE = "old-size"  # the size the proof starts from (the last checkpoint this silo cosigned)
# Proofs from the sizes of checkpoints sent to this silo whose cosignature never came back (a reply lost to a crash): each
# entry is the size (8 bytes, big-endian) followed by the proof's 32-byte hashes; the silo uses the one from the size it holds.
OTHER_PROOFS = "other-proofs"
COSIGNED = "cosigned"  # the checkpoint note with the silo's cosignature added
COORDINATOR_LOG_KEY = "fedsilo-coordinator"  # name of the coordinator's checkpoint key
NUM_EXAMPLES = "num-examples"
TENSOR_NAMES = "tensor-names"  # secure rounds: JSON list of the model's tensor names, in the order Flower's parameters carry them

# Error codes of refusal replies (Flower Error.code); the reason is a one-line message.
ERR_REFUSED = 1001  # plan, policy or budget refusal
ERR_BAD_INPUT = 1002  # the site's data or configuration is unusable
ERR_INTERNAL = 1003  # an unexpected failure at the silo (details stay in the silo's log)
