"""`bubuh kafka principal` without a broker: the parser, --password-env, the monitor's ACLs.

The broker side (credentials and ACLs taking effect) is tests/integration/test_kafka_security.py; here
the admin client is replaced, so nothing connects anywhere.
"""

from __future__ import annotations

import argparse

import pytest
from confluent_kafka.admin import AclOperation, ResourcePatternType, ResourceType

from services.kernel import access, topics
from services.kernel.settings import Settings
from services.operator import cli


def principal_args(*argv: str):
    return cli.build_parser().parse_args(["kafka", "principal", *argv])


class NoAdmin:
    """Stands in for AccessAdmin: constructing it means the command went on to talk to Kafka."""

    made = 0

    def __init__(self, settings, *args, **kwargs) -> None:
        type(self).made += 1


@pytest.fixture
def offline(monkeypatch):
    """cmd_kafka with no broker: AccessAdmin and create_principal replaced, their calls recorded."""
    calls: list[tuple] = []
    NoAdmin.made = 0
    monkeypatch.setattr(access, "AccessAdmin", NoAdmin)

    def create_principal(admin, settings, user, bindings, password=None):
        calls.append((user, bindings, password))
        return user, password or "generated-password"

    monkeypatch.setattr(access, "create_principal", create_principal)
    monkeypatch.setenv("BUBUH_KAFKA_ADMIN_USERNAME", "bubuh-admin")
    monkeypatch.setenv("BUBUH_KAFKA_ADMIN_PASSWORD", "admin-password")
    return calls


def test_the_parser_takes_the_name_of_a_password_variable_never_a_password():
    args = principal_args("api", "--password-env", "KAFKA_API_PASSWORD")
    assert args.service == "api" and args.password_env == "KAFKA_API_PASSWORD"
    assert principal_args("api").password_env is None, "without it a new password is generated"
    with pytest.raises(SystemExit):
        principal_args("api", "--password-env")          # a name is required


def subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


def test_the_cli_offers_every_principal_access_knows():
    principal = subcommand(subcommand(cli.build_parser(), "kafka"), "principal")
    (choices,) = [a.choices for a in principal._actions if a.dest == "service"]
    assert set(choices) == set(access.principal_names())
    assert access.MONITOR in choices


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_password_env_unset_or_empty_is_a_clear_error_before_any_connection(offline, monkeypatch, capsys, value):
    if value is None:
        monkeypatch.delenv("BUBUH_TEST_NO_SUCH_PASSWORD", raising=False)
    else:
        monkeypatch.setenv("BUBUH_TEST_NO_SUCH_PASSWORD", value)
    with pytest.raises(SystemExit) as exc:
        cli.main(["kafka", "principal", "quota", "--password-env", "BUBUH_TEST_NO_SUCH_PASSWORD"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "BUBUH_TEST_NO_SUCH_PASSWORD" in err and "unset or empty" in err
    assert NoAdmin.made == 0 and not offline, "no admin client, no principal"


def test_password_env_sets_that_password_and_never_prints_it(offline, monkeypatch, capsys):
    monkeypatch.setenv("KAFKA_QUOTA_PASSWORD", "s3cret-from-env_1")
    for _ in range(2):                                   # again: the same password, the same ACLs
        cli.main(["kafka", "principal", "quota", "--password-env", "KAFKA_QUOTA_PASSWORD"])
    out = capsys.readouterr().out
    assert "s3cret-from-env_1" not in out and "KAFKA_QUOTA_PASSWORD" in out
    s = Settings()
    expected = access.service_bindings(s, "bubuh-quota", access.SERVICES["quota"])
    assert offline == [("bubuh-quota", expected, "s3cret-from-env_1")] * 2


def test_without_password_env_a_new_password_is_generated_and_shown_once(offline, capsys):
    cli.main(["kafka", "principal", "api"])
    assert offline[0][0] == "bubuh-api" and offline[0][2] is None
    assert "generated-password" in capsys.readouterr().out


def test_the_monitor_may_describe_topics_and_groups_and_nothing_else():
    s = Settings(topic_prefix="p.")
    bindings = access.bindings_of(s, access.MONITOR)
    assert {b.principal for b in bindings} == {"User:bubuh-monitor"}
    assert {b.operation for b in bindings} == {AclOperation.DESCRIBE}, "no READ (joins, commits), no configs"
    literal = {(b.restype, b.name) for b in bindings if b.resource_pattern_type == ResourcePatternType.LITERAL}
    assert {(ResourceType.TOPIC, s.topic(t.name)) for t in topics.ALL} <= literal
    groups = {g for r in access.SERVICES.values() for g in r.groups}
    assert {(ResourceType.GROUP, s.group(g)) for g in groups} <= literal, "every consumer group's lag"
    assert all(b.name.startswith("p.") for b in bindings), "under the settings' prefix"
