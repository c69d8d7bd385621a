"""The event contracts keep decoding what is already on topics and in dead-letter queues.

An envelope names its payload's type by full protobuf name (``bubuh.v1.PurchaseSubmitted``), and
dead-letter topics keep the original records unchanged, so a renamed message or package would turn
every record written before the rename into ``EVENT_TYPE_UNKNOWN``. The channel-facing messages
moved to their own file (``proto/bubuh/v1/channel_door.proto``) under their old full names.
"""

from __future__ import annotations

import datetime as dt
import importlib

import pytest

from services.contracts.bubuh.v1 import channel_door_pb2, envelope_pb2, purchase_pb2
from services.kernel import errors, events, signatures
from services.kernel.settings import REPO_ROOT
from tests import channeldoc

# every type name records were written under before the channel door got its own file
NAMES_ON_TOPICS = {
    "bubuh.v1.Envelope", "bubuh.v1.DeadLetter", "bubuh.v1.Attempt", "bubuh.v1.Channel",
    "bubuh.v1.PurchaseSubmitted", "bubuh.v1.PurchaseConfirmed", "bubuh.v1.PurchaseRejected",
    "bubuh.v1.Balance", "bubuh.v1.QuotaCredited", "bubuh.v1.QuotaReserved", "bubuh.v1.QuotaRejected",
    "bubuh.v1.QuotaCommitted", "bubuh.v1.QuotaReleased", "bubuh.v1.QuotaRefused",
    "bubuh.v1.Placement", "bubuh.v1.StampRequested", "bubuh.v1.StampCompleted", "bubuh.v1.StampFailed",
    "bubuh.v1.DeliveryAbandoned",
}

# record values serialised by the code before the move (generated from main's envelope.proto and
# purchase.proto): a channel's signed submission and a purchase service confirmation
OLD_SUBMITTED = bytes.fromhex(
    "0a2437643966306335652d326134312d346238652d396333642d3566366137623863396430651a2034626639326633353737"
    "6233346461366133636539323964306530653437333622176368616e6e656c3a63685f3061316232633364346535662a0608"
    "ecbde4b606321a62756275682e76312e50757263686173655375626d69747465643a47120f63685f30613162326333643465"
    "35661a08504f532d30303031220e6170706c6963616e742d33313731280230a09c013a0608b0bde4b606420c56412d383830"
    "382d31323334")
OLD_CONFIRMED = bytes.fromhex(
    "0a03652d3222087075726368617365321a62756275682e76312e5075726368617365436f6e6669726d65643a360a03702d31"
    "120f63685f3061316232633364346535661a08504f532d30303031220e6170706c6963616e742d33313731280230a09c01")


def test_every_type_name_on_topics_still_decodes():
    assert NAMES_ON_TOPICS <= set(events.TYPES), NAMES_ON_TOPICS - set(events.TYPES)


def test_a_submission_written_before_the_move_decodes():
    env, msg = events.decode(OLD_SUBMITTED)
    assert isinstance(msg, channel_door_pb2.PurchaseSubmitted)
    assert env.event_id == "7d9f0c5e-2a41-4b8e-9c3d-5f6a7b8c9d0e"
    assert env.producer == "channel:ch_0a1b2c3d4e5f"
    assert (msg.channel_id, msg.channel_order_id, msg.account_id, msg.quantity, msg.amount, msg.payment_ref) == \
        ("ch_0a1b2c3d4e5f", "POS-0001", "applicant-3171", 2, 20000, "VA-8808-1234")
    assert msg.paid_at.ToDatetime(tzinfo=dt.UTC) == dt.datetime(2024, 9, 5, 3, 0, tzinfo=dt.UTC)
    # and re-encodes to the same bytes: the wire form did not change, so HMACs over it still verify
    assert env.SerializeToString() == OLD_SUBMITTED


def test_an_internal_event_written_before_the_move_decodes():
    _, msg = events.decode(OLD_CONFIRMED)
    assert isinstance(msg, purchase_pb2.PurchaseConfirmed)
    assert (msg.purchase_id, msg.quantity) == ("p-1", 2)


def test_the_moved_messages_are_still_reachable_where_services_import_them():
    assert envelope_pb2.Envelope is channel_door_pb2.Envelope
    assert purchase_pb2.PurchaseSubmitted is channel_door_pb2.PurchaseSubmitted


def test_the_channel_door_file_stands_alone():
    """A channel compiles channel_door.proto without any internal file."""
    deps = [d.name for d in channel_door_pb2.DESCRIPTOR.dependencies]
    assert deps == ["google/protobuf/timestamp.proto"]
    assert set(channel_door_pb2.DESCRIPTOR.message_types_by_name) == {"Envelope", "PurchaseSubmitted"}


def test_an_unknown_type_name_is_still_refused():
    env = envelope_pb2.Envelope(event_id="e", type="bubuh.v2.PurchaseSubmitted", payload=b"")
    with pytest.raises(errors.BubuhError) as exc:
        events.decode(env.SerializeToString())
    assert exc.value.code == errors.EVENT_TYPE_UNKNOWN


def test_the_documented_example_is_what_the_platform_accepts():
    """docs/channels.md's worked example decodes, verifies and names its order as the page says."""
    doc = channeldoc.value
    value = channeldoc.record_value()
    env, msg = events.decode(value)
    assert isinstance(msg, channel_door_pb2.PurchaseSubmitted)
    assert (env.event_id, env.trace_id, env.type) == (doc("event_id"), doc("trace_id"), "bubuh.v1.PurchaseSubmitted")
    assert env.producer == f"channel:{doc('channel_id')}"
    assert env.occurred_at.ToDatetime(tzinfo=dt.UTC) == dt.datetime.fromisoformat(doc("occurred_at"))
    assert (msg.channel_id, msg.channel_order_id, msg.account_id, msg.payment_ref) == \
        (doc("channel_id"), doc("channel_order_id"), doc("account_id"), doc("payment_ref"))
    assert (msg.quantity, msg.amount) == (int(doc("quantity")), int(doc("amount")))
    assert msg.paid_at.ToDatetime(tzinfo=dt.UTC) == dt.datetime.fromisoformat(doc("paid_at"))
    assert msg.purchase_id == ""
    # the platform's own check, with the secret as the page says to use it (ASCII, not hex-decoded)
    assert signatures.matches([doc("secret").encode("ascii")], value, doc("bubuh-hmac"))
    assert doc("bubuh-hmac") == signatures.hmac_hex(doc("secret").encode("ascii"), value)
    assert not signatures.matches([bytes.fromhex(doc("secret"))], value, doc("bubuh-hmac"))
    assert len(value) == 206 and len(env.payload) == 71          # the sizes the page states
    assert value == OLD_SUBMITTED                                # the same record the old files wrote


def test_every_contract_file_names_its_go_and_java_packages():
    """protoc-gen-go refuses a file without go_package; Java code lands in a package of ours."""
    files = sorted((REPO_ROOT / "proto" / "bubuh" / "v1").glob("*.proto"))
    assert files
    for f in files:
        module = importlib.import_module(f"services.contracts.bubuh.v1.{f.stem}_pb2")
        options = module.DESCRIPTOR.GetOptions()
        assert options.go_package.endswith("/bubuh/v1;bubuhv1"), f.name
        assert options.java_package == "id.bubuh.contracts.v1", f.name
        assert options.java_multiple_files, f.name
