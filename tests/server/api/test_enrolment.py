"""server/api/enrolment.py with a real CA and a real database file: proofs, identities, clones, rate limits."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.lifecycle.identity import csr_for, key_proof, new_key_and_csr
from agent.shared import wire
from server.api import pki
from server.api.enrolment import MAX_FAILURES, Enrolment, create_token
from server.database.connection import parse_database
from server.database.storage import Storage
from server.errors import BadProof, BadRequest, NonceInvalid, RateLimited, TokenUsedUp

PASSPHRASE = "correct horse battery staple"
NOW = 1_800_000_000.0


@pytest.fixture
def enrolment(database: str) -> Iterator[Enrolment]:
    ca = pki.create_ca("test CA", dt.datetime.fromtimestamp(NOW, dt.UTC))
    storage = Storage.open(parse_database(database), create=True)
    yield Enrolment(storage, ca, lambda: PASSPHRASE, lambda: b"{}")
    storage.close()


def request(
    e: Enrolment,
    machine_id: str,
    *,
    host_id: str | None = None,
    signer: ec.EllipticCurvePrivateKey | None = None,
    secret: str = PASSPHRASE,
    key: ec.EllipticCurvePrivateKey | None = None,
    token_id: str | None = None,
    failover_point: str | None = None,
) -> tuple[dict[str, Any], ec.EllipticCurvePrivateKey]:
    if key is None:
        key, csr = new_key_and_csr(host_id)
    else:
        csr = csr_for(key, host_id)
    nonce = e.new_nonce(NOW)
    req = wire.EnrolRequest(
        csr=csr.decode(),
        nonce=nonce,
        proof=wire.enrol_proof(secret, nonce, csr),
        hostname=f"host-{machine_id[:4]}",
        os_tag="DEBIAN12",
        role="MS",
        platform="VmWare",
        facts=wire.MachineFacts(machine_id=machine_id),
        agent_version="0.1.0",
        host_id=host_id,
        key_proof=key_proof(signer, nonce, csr) if signer else None,
        token_id=token_id,
        failover_point=failover_point,
    )
    return req.to_json(), key


def test_identity_follows_the_key_not_the_facts(enrolment: Enrolment) -> None:
    body, key = request(enrolment, "a" * 32)
    first = enrolment.enrol(body, "10.0.0.1", NOW)
    host = first["host_id"]
    assert first["cloned_from"] is None

    # Same machine, proves its key: same host, new key recorded.
    body, key2 = request(enrolment, "a" * 32, host_id=host, signer=key)
    assert enrolment.enrol(body, "10.0.0.1", NOW)["host_id"] == host
    # The old key no longer proves anything: the new one does.
    body, _ = request(enrolment, "a" * 32, host_id=host, signer=key)
    assert enrolment.enrol(body, "10.0.0.1", NOW)["cloned_from"] == host
    body, _ = request(enrolment, "a" * 32, host_id=host, signer=key2)
    assert enrolment.enrol(body, "10.0.0.1", NOW)["host_id"] == host

    # Its key on other facts (a copied disk): a clone.
    body, _ = request(enrolment, "b" * 32, host_id=host, signer=key2)
    clone = enrolment.enrol(body, "10.0.0.2", NOW)
    assert (clone["host_id"] != host, clone["cloned_from"]) == (True, host)

    # Its facts without its key, with or without naming it: never the original.
    for named in (None, host):
        body, _ = request(enrolment, "a" * 32, host_id=named)
        taken = enrolment.enrol(body, "10.0.0.3", NOW)
        assert (taken["host_id"] != host, taken["cloned_from"]) == (True, host)
    record = enrolment.storage.machine(host)
    assert record is not None and record.hostname == "host-aaaa"


def test_an_enrolment_asked_for_again_with_its_key_is_the_same_enrolment(enrolment: Enrolment) -> None:
    """The agent keeps its key until an answer is stored: an enrolment whose answer was lost comes again with the
    same key (and a new nonce and proof), and gets the machine recorded the first time: a first enrolment, a clone's
    (naming its original), and one with a single-use token, whose one use it does not take twice."""

    def machines() -> int:
        return len(enrolment.storage.machines())

    body, key = request(enrolment, "a" * 32)
    first = enrolment.enrol(body, "10.0.0.1", NOW)
    body, _ = request(enrolment, "a" * 32, key=key)
    again = enrolment.enrol(body, "10.0.0.1", NOW)
    assert (again["host_id"], again["cloned_from"], machines()) == (first["host_id"], None, 1)
    assert again["certificate"] != first["certificate"]  # a new certificate for the key: the first was never read

    body, clone_key = request(enrolment, "b" * 32, host_id=first["host_id"], signer=key)
    clone = enrolment.enrol(body, "10.0.0.2", NOW)
    body, _ = request(enrolment, "b" * 32, host_id=first["host_id"], signer=key, key=clone_key)
    assert enrolment.enrol(body, "10.0.0.2", NOW)["host_id"] == clone["host_id"] and machines() == 2

    token_id, token = create_token(enrolment.storage, 3600, 1, NOW)
    split = wire.split_token(token)
    assert split is not None and split[0] == token_id
    secret = split[1]
    body, token_key = request(enrolment, "c" * 32, secret=secret, token_id=token_id)
    tokened = enrolment.enrol(body, "10.0.0.3", NOW)
    body, _ = request(enrolment, "c" * 32, secret=secret, token_id=token_id, key=token_key)
    assert enrolment.enrol(body, "10.0.0.3", NOW)["host_id"] == tokened["host_id"] and machines() == 3
    body, _ = request(enrolment, "d" * 32, secret=secret, token_id=token_id)  # another machine: the use is gone
    with pytest.raises(TokenUsedUp):
        enrolment.enrol(body, "10.0.0.4", NOW)
    # The same key on other facts is not the same enrolment (a copy of a machine mid-enrolment): a new machine.
    body, _ = request(enrolment, "e" * 32, key=key)
    assert enrolment.enrol(body, "10.0.0.5", NOW)["host_id"] not in (first["host_id"], clone["host_id"])


POINT = "0b7f1a52-3c1e-4f57-9a0e-2f1d6c7b8e90"


def test_a_failover_registers_as_a_new_machine_failover_of_its_source(enrolment: Enrolment) -> None:
    """A recovery point of a host, booted and registering as itself with the host's key: a new machine marked
    failover_of the host, with its point, whatever its facts (the same as the source's here: a hypervisor may give
    the failed-over VM the source's identity); the source's record stays as it was. Asked for again with its key, the
    same enrolment. The same claim without the source's key is only a name: a clone, never a failover."""
    body, source_key = request(enrolment, "a" * 32)
    source = enrolment.enrol(body, "10.0.0.1", NOW)["host_id"]
    before = enrolment.storage.machine(source)

    body, key = request(enrolment, "a" * 32, host_id=source, signer=source_key, failover_point=POINT)
    answer = enrolment.enrol(body, "10.0.0.9", NOW)
    assert answer["host_id"] != source
    assert (answer["failover_of"], answer["cloned_from"]) == (source, None)
    record = enrolment.storage.machine(answer["host_id"])
    assert record is not None and (record.failover_of, record.failover_point, record.cloned_from) == (
        source,
        POINT,
        None,
    )
    assert enrolment.storage.machine(source) == before  # the source keeps its key, certificate and facts

    body, _ = request(enrolment, "a" * 32, host_id=source, signer=source_key, failover_point=POINT, key=key)
    again = enrolment.enrol(body, "10.0.0.9", NOW)
    assert (again["host_id"], again["failover_of"]) == (answer["host_id"], source)
    assert len(enrolment.storage.machines()) == 2

    body, _ = request(enrolment, "b" * 32, host_id=source, failover_point=POINT)  # no proof of the source's key
    unproven = enrolment.enrol(body, "10.0.0.10", NOW)
    assert unproven["host_id"] not in (source, answer["host_id"])
    assert (unproven["failover_of"], unproven["cloned_from"]) == (None, source)

    body, _ = request(enrolment, "c" * 32, host_id=source, signer=source_key)
    body["failover_point"] = "not-a-point"
    with pytest.raises(BadRequest) as bad:
        enrolment.enrol(body, "10.0.0.11", NOW)
    assert "enrolment.failover_point is not a UUID in canonical form" in bad.value.message


def test_proofs_nonces_and_the_rate_limit(enrolment: Enrolment) -> None:
    body, _ = request(enrolment, "c" * 32, secret="wrong")
    with pytest.raises(BadProof):
        enrolment.enrol(body, "10.0.0.9", NOW)
    with pytest.raises(NonceInvalid):  # the nonce was used by the failed attempt
        enrolment.enrol(body, "10.0.0.9", NOW)
    with pytest.raises(BadRequest):
        enrolment.enrol({"csr": 1}, "10.0.0.9", NOW)
    for _ in range(MAX_FAILURES - 3):
        with pytest.raises(BadRequest):
            enrolment.enrol([], "10.0.0.9", NOW)
    good, _ = request(enrolment, "c" * 32)
    with pytest.raises(RateLimited) as limited:
        enrolment.enrol(good, "10.0.0.9", NOW)
    assert limited.value.retry_after is not None and limited.value.retry_after > 0
    assert enrolment.enrol(good, "10.0.0.10", NOW)["host_id"]  # another address is not affected
