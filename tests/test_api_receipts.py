"""Deletion receipts, the deletion log over HTTP, a record's status, and no id kept in clear.

Every expected value is computed here independently of ``app.receipts``: the keyed digests with
``hmac``, the checkpoint hash with ``hashlib`` over the files, the signature with ``cryptography``'s
Ed25519 directly on JSON serialised here.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from app.cli import main as cli_main
from app.receipts import ReceiptError, verify

pytestmark = pytest.mark.redis

WRITE = {"Authorization": "Bearer write-token"}
READ = {"Authorization": "Bearer read-token"}


def _forget(client, ids: list[str]) -> str:
    r = client.post("/v1/forget", json={"ids": ids}, headers=WRITE)
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def _hmac(data: Path, record_id: str) -> str:
    secret = (data / "id_secret").read_bytes()
    return hmac.new(secret, record_id.encode(), hashlib.sha256).hexdigest()


def _tree_sha256(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(directory)).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def test_a_receipt_verifies_offline_and_any_change_is_detected(
    client, settings, wait_for_job, tmp_path, capsys
):
    data = settings.data_dir
    job_id = _forget(client, ["r03", "r07"])
    job = wait_for_job(client, job_id)
    assert job["status"] == "succeeded", job
    r = client.get(f"/v1/jobs/{job_id}/receipt", headers=READ)
    assert r.status_code == 200, r.text
    receipt = r.json()
    assert receipt == job["receipt"]
    key = client.get("/v1/receipts/public-key", headers=READ).json()
    assert key["algorithm"] == "Ed25519"

    # The signature, checked with cryptography directly over JSON serialised here.
    public = serialization.load_pem_public_key(key["public_key_pem"].encode())
    signed = json.dumps(receipt["payload"], sort_keys=True, separators=(",", ":")).encode()
    public.verify(base64.b64decode(receipt["signature"]), signed)  # raises if it does not match
    # What it states, against independent values.
    payload = receipt["payload"]
    assert payload["job_id"] == job_id
    assert payload["id_digests"] == sorted(_hmac(data, i) for i in ("r03", "r07"))
    assert (payload["version_before"], payload["version_after"]) == (0, 1)
    assert payload["submitted_at"] == job["submitted_at"]
    assert payload["checkpoint_sha256"] == _tree_sha256(data / "checkpoints" / "1")
    certificate = payload["certificate"]
    assert 0 <= certificate["residual"] <= certificate["tolerance"]
    assert certificate["method"] == job["solver"]["method"]
    logged = json.loads((data / "deletions.log").read_text().splitlines()[0])
    assert payload["applied_at"] == logged["timestamp"]
    assert (data / "id_secret").stat().st_mode & 0o777 == 0o600
    assert (data / "receipt_key.pem").stat().st_mode & 0o777 == 0o600

    # The documented command: valid as served.
    receipt_file, key_file = tmp_path / "receipt.json", tmp_path / "key.pem"
    receipt_file.write_text(json.dumps(receipt))
    key_file.write_text(key["public_key_pem"])
    args = ["verify-receipt", str(receipt_file), "--public-key", str(key_file)]
    cli_main(args)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"valid: job {job_id}")
    # ... and whether the certificate was met, by the publication rule recomputed here
    limit = certificate["tolerance"] * certificate.get("accept_floor", 1.0)
    assert certificate["residual"] <= limit
    assert out[1].startswith("certificate met: ") and "not enforced" not in out[1]
    assert f"{certificate['residual']:.2e}" in out[1]
    cli_main([*args, "--json", "--require-certificate"])
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["signature_valid"] is True and verdict["payload"] == payload
    assert verdict["certificate"]["status"] == "met" and verdict["certificate"]["enforced"]
    assert verdict["certificate"]["value"] == certificate["residual"]

    # Any changed field of the payload, or of the signature, is detected.
    def altered(value):
        if isinstance(value, bool) or value is None:
            return "x"
        if isinstance(value, int | float):
            return value + 1
        if isinstance(value, str):
            return value[:-1] + ("0" if value[-1:] != "0" else "1")
        if isinstance(value, list):
            return value[:-1] if value else ["x"]
        return {**value, "extra": 1}

    tampered = []
    for field in payload:
        forged = copy.deepcopy(receipt)
        forged["payload"][field] = altered(payload[field])
        tampered.append(forged)
    for field in certificate:
        forged = copy.deepcopy(receipt)
        forged["payload"]["certificate"][field] = altered(certificate[field])
        tampered.append(forged)
    signature = bytearray(base64.b64decode(receipt["signature"]))
    signature[0] ^= 1
    tampered.append({**receipt, "signature": base64.b64encode(bytes(signature)).decode()})
    assert len(tampered) == len(payload) + len(certificate) + 1
    for forged in tampered:
        with pytest.raises(ReceiptError):
            verify(forged, key["public_key_pem"])
        receipt_file.write_text(json.dumps(forged))
        with pytest.raises(SystemExit) as exit_:
            cli_main(args)
        assert exit_.value.code == 1
        assert "NOT VALID" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli_main([*args, "--json"])
    assert exit_.value.code == 1
    assert json.loads(capsys.readouterr().out)["signature_valid"] is False

    # A repeated key hides a signed value from readers that keep the first: not valid.
    served = json.dumps(receipt)
    field = f'"version_after": {payload["version_after"]}'
    assert served.count(field) == 1
    receipt_file.write_text(served.replace(field, f'"version_after": 99, {field}'))
    with pytest.raises(SystemExit) as exit_:
        cli_main(args)
    assert exit_.value.code == 1 and "repeats the key(s) version_after" in capsys.readouterr().err
    # A public key that cannot be read says nothing about the receipt: exit 2, not NOT VALID.
    receipt_file.write_text(served)
    for bad in ("not a key", "{ not json", '{"public_key_pem": 5}', "{}"):
        key_file.write_text(bad)
        with pytest.raises(SystemExit) as exit_:
            cli_main(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "cannot read the input" in err, (bad, err)
        assert "Traceback" not in err and "NOT VALID" not in err
    # Nor does JSON that is no receipt at all (a 404 body saved in its place): exit 2, saying so;
    # a receipt with a field taken away stays NOT VALID (exit 1).
    key_file.write_text(key["public_key_pem"])
    for body in ({"detail": "no such job"}, [receipt], "receipt"):
        receipt_file.write_text(json.dumps(body))
        with pytest.raises(SystemExit) as exit_:
            cli_main(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "is not a receipt" in err, (body, err)
        assert "NOT VALID" not in err
    with pytest.raises(SystemExit) as exit_:  # --json: still one JSON object, nothing checked
        cli_main([*args, "--json"])
    verdict = json.loads(capsys.readouterr().out)
    assert exit_.value.code == 2 and verdict["signature_valid"] is None
    assert "is not a receipt" in verdict["error"]
    receipt_file.write_text(json.dumps({k: v for k, v in receipt.items() if k != "payload"}))
    with pytest.raises(SystemExit) as exit_:
        cli_main(args)
    assert exit_.value.code == 1 and "NOT VALID" in capsys.readouterr().err


def test_receipt_of_a_job_not_succeeded_and_of_no_job(client):
    assert client.get("/v1/jobs/nope/receipt", headers=READ).status_code == 404
    assert client.get("/v1/receipts/public-key").status_code == 401  # a read like the others


def test_a_job_that_succeeded_without_a_version_of_its_own_says_why_it_has_no_receipt(client):
    """Its ids were already forgotten when it ran (the worker marks it succeeded, no version):
    the 409 says so and where the receipt is, not that it 'is succeeded' and needs to succeed."""
    queue = client.app.state.service.queue
    job_id = "already-forgotten-job"  # its record as the worker leaves it (no stream entry)
    queue.client.hset(
        queue.job_key(job_id),
        mapping={
            "job_id": job_id,
            "status": "succeeded",
            "submitted_at": "2026-12-04T10:00:00.000+00:00",
            "model_version": "0",
        },
    )
    r = client.get(f"/v1/jobs/{job_id}/receipt", headers=READ)
    assert r.status_code == 409, r.text
    detail = r.json()["detail"]
    assert "succeeded without a version of its own" in detail and "already forgotten" in detail
    assert "GET /v1/records/{id}" in detail


def test_records_answer_active_forgotten_unknown(client, settings, wait_for_job):
    job_id = _forget(client, ["r05"])
    assert wait_for_job(client, job_id)["status"] == "succeeded"
    logged = json.loads((settings.data_dir / "deletions.log").read_text().splitlines()[0])

    def status(record_id: str) -> dict:
        r = client.get(f"/v1/records/{record_id}", headers=READ)
        assert r.status_code == 200, r.text
        return r.json()

    assert status("r06") == {
        "status": "active",
        "model_version": 1,
        "forgotten_in_version": None,
        "forgotten_at": None,
        "job_id": None,
        "pending": None,
    }
    assert status("r05") == {
        "status": "forgotten",
        "model_version": 1,
        "forgotten_in_version": 1,
        "forgotten_at": logged["timestamp"],
        "job_id": job_id,
        "pending": None,
    }
    assert status("never-a-record")["status"] == "unknown"
    # a deletion in flight shows (an auditor saw "active" and nothing else while it ran)
    queue = client.app.state.service.queue
    queue.client.sadd(queue.pending_key, "r07", "new-record")
    queue.client.sadd(queue.pending_add_key, "new-record")
    try:
        assert status("r07")["status"] == "active" and status("r07")["pending"] == "forget"
        assert status("new-record") == {**status("never-a-record"), "pending": "add"}
    finally:
        queue.client.srem(queue.pending_key, "r07", "new-record")
        queue.client.srem(queue.pending_add_key, "new-record")
    assert status("r07")["pending"] is None
    # a re-forget is still told it was forgotten (409), from the digest alone
    r = client.post("/v1/forget", json={"ids": ["r05"]}, headers=WRITE)
    assert r.status_code == 409, r.text


def test_deletions_are_paged_oldest_first(client, settings, wait_for_job):
    batches = [["r10"], ["r11", "r12"], ["r13"]]
    jobs = []
    for ids in batches:  # one at a time: three versions
        jobs.append(_forget(client, ids))
        assert wait_for_job(client, jobs[-1])["status"] == "succeeded"
    # lines that are JSON but not records (a hand edit) are skipped, not a 500
    with open(settings.data_dir / "deletions.log", "a") as f:
        f.write('null\n5\n{"version": "abc"}\n{"version": 9}\n' + "[" * 10**5 + "]" * 10**5 + "\n")

    def page(**params) -> dict:
        r = client.get("/v1/deletions", params=params, headers=READ)
        assert r.status_code == 200, r.text
        return r.json()

    first = page(limit=2)
    assert [d["version"] for d in first["deletions"]] == [1, 2] and first["next_cursor"] == 2
    second = page(cursor=first["next_cursor"], limit=2)
    assert [d["version"] for d in second["deletions"]] == [3] and second["next_cursor"] is None
    assert page(cursor=3)["deletions"] == []
    every = first["deletions"] + second["deletions"]
    assert [d["job_ids"] for d in every] == [[j] for j in jobs]
    assert [d["id_digests"] for d in every] == [
        [_hmac(settings.data_dir, i) for i in ids] for ids in batches
    ]
    assert [d["version_before"] for d in every] == [0, 1, 2]
    assert client.get("/v1/deletions?limit=0", headers=READ).status_code == 422
    r = client.get("/v1/records/r11", headers=READ)
    assert r.status_code == 200 and r.json()["forgotten_in_version"] == 2, r.text


def test_no_id_in_clear_once_its_job_succeeded(client, settings, wait_for_job, redis_prefix):
    job_id = _forget(client, ["r09"])
    job = wait_for_job(client, job_id)
    assert job["status"] == "succeeded"
    assert job["ids"] == [] and job["id_digests"] == [_hmac(settings.data_dir, "r09")]
    needle = b'"r09"'  # as JSON writes it (checkpoint metadata, log, job records)
    for path in (p for p in settings.data_dir.rglob("*") if p.is_file()):
        assert needle not in path.read_bytes(), path
    queue = client.app.state.service.queue
    for key in queue.client.scan_iter(f"{redis_prefix}:*"):
        kind = queue.client.type(key)
        if kind == "hash":
            values = queue.client.hgetall(key).values()
        elif kind == "set":
            values = queue.client.smembers(key)
        elif kind == "string":
            values = [queue.client.get(key)]
        else:
            continue
        assert not [v for v in values if "r09" in v], key
