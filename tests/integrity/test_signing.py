"""Signatures in the OpenSSF Model Signing format (``model.sig``): made by make-delta and sign,
checked by apply and verify against a pinned key or certificate root before any weight is read,
readable by the format's own tool, and pushed with the delta.

Keys and certificates are made here (EC P-256), so no test reaches a network.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import assert_states_equal, llama_state, load_state, save_checkpoint
from hubserver import DEFAULT_TOKEN

import deltamerge.apply
from deltamerge.cli import main
from deltamerge.errors import InputError
from deltamerge.integrity.signing import SIGNATURE_NAME, SignerPin, check_folder, verify_folder

pytest_plugins = ["hub_fixtures"]

LEAF_NAME = "CN=Alice Publisher,O=Example Labs"


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(result, *words: str) -> str:
    """Exit 2 and one line of stderr holding ``words``."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def write_key(folder: Path, name: str) -> SimpleNamespace:
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return SimpleNamespace(key=key, private=private, public=public,
                           fingerprint="sha256:" + hashlib.sha256(der).hexdigest())


def name(text: str) -> x509.Name:
    return x509.Name.from_rfc4514_string(text)


def certificate(subject: str, key, issuer: str, issuer_key, start: datetime.datetime, ca: bool):
    builder = (
        x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=not ca, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
            encipher_only=False, decipher_only=False), critical=True)
    )
    return builder.sign(issuer_key, hashes.SHA256())


def write_chain(folder: Path, root_name: str, leaf_name: str) -> SimpleNamespace:
    """A root and a leaf it issued, the root's start no later than the leaf's."""
    start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
    root_key, leaf = ec.generate_private_key(ec.SECP256R1()), write_key(folder, "leaf")
    root = certificate(root_name, root_key, root_name, root_key, start, ca=True)
    cert = certificate(leaf_name, leaf.key, root_name, root_key,
                       start + datetime.timedelta(hours=1), ca=False)
    paths = SimpleNamespace(root=folder / "root.pem", leaf=folder / "leaf-cert.pem",
                            key=leaf.private)
    paths.root.write_bytes(root.public_bytes(serialization.Encoding.PEM))
    paths.leaf.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return paths


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("signing")
    keys = root / "keys"
    keys.mkdir()
    base = save_checkpoint(llama_state(0), root / "base")
    target = save_checkpoint(llama_state(1), root / "target")
    alice, mallory = write_key(keys, "alice"), write_key(keys, "mallory")
    delta = root / "delta"
    result = invoke("make-delta", base, target, delta, "--sign-key", alice.private)
    assert result.exit_code == 0, result.output
    assert f"signed by      key {alice.fingerprint}" in result.output
    chain = write_chain(keys, "CN=Example Root CA,O=Example Labs", LEAF_NAME)
    (root / "other-keys").mkdir()
    other = write_chain(root / "other-keys", "CN=Example Root CA,O=Example Labs", LEAF_NAME)
    cert_delta = root / "cert-delta"
    result = invoke("make-delta", base, target, cert_delta, "--sign-key", chain.key,
                    "--sign-cert", chain.leaf, "--sign-chain", chain.root, "-q")
    assert result.exit_code == 0, result.output
    return SimpleNamespace(root=root, base=base, target=target, delta=delta, alice=alice,
                           mallory=mallory, chain=chain, other=other, cert_delta=cert_delta)


@pytest.fixture
def no_weights_read(monkeypatch):
    """Fail the test if apply opens any checkpoint (the signature must refuse first)."""
    def opened(*args, **kwargs):
        raise AssertionError("a checkpoint was opened before the signature refused")

    monkeypatch.setattr(deltamerge.apply, "open_checkpoint", opened)
    monkeypatch.setattr(deltamerge.apply, "preflight", opened)


def copy_delta(made, tmp_path: Path) -> Path:
    return Path(shutil.copytree(made.delta, tmp_path / "delta"))


def test_make_delta_signs_the_finished_folder_and_apply_checks_it(made, tmp_path):
    files = sorted(p.name for p in made.delta.iterdir())
    assert SIGNATURE_NAME in files and "deltamerge.json" in files and "journal.jsonl" not in files
    statement = json.loads(base64.b64decode(
        json.loads((made.delta / SIGNATURE_NAME).read_bytes())["dsseEnvelope"]["payload"]))
    signed = {r["name"]: r for r in statement["predicate"]["resources"]}
    assert set(signed) == set(files) - {SIGNATURE_NAME}  # every file, the manifest included
    ignored = statement["predicate"]["serialization"]["ignore_paths"]
    git = {".git", ".github", ".gitattributes", ".gitignore"}  # as the format's tool leaves out
    assert set(ignored) - git == {SIGNATURE_NAME, "journal.jsonl", "README.md"}  # card: push's
    assert {r["algorithm"] for r in signed.values()} == {"sha256"}

    out = tmp_path / "out"
    result = invoke("apply", made.base, made.delta, out, "--signer-key", made.alice.public)
    assert result.exit_code == 0, result.output
    assert f"signed    by key {made.alice.fingerprint} (verified)" in result.output
    assert "matches the publisher's result" in result.output
    record = json.loads((out / "deltamerge-result.json").read_text())
    assert record["signatures"] == [{"folder": "delta", "method": "key",
                                     "signer": made.alice.fingerprint, "verified": True}]
    unsigned = tmp_path / "unsigned-out"
    assert invoke("apply", made.base, made.delta, unsigned, "-q").exit_code == 0
    assert_states_equal(load_state(out), load_state(unsigned))


def test_a_signed_delta_applied_without_a_pin_says_it_was_not_checked(made, tmp_path):
    result = invoke("apply", made.base, made.delta, tmp_path / "out")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if "model.sig" in line]
    assert len(notes) == 1 and "signature was not checked" in notes[0], result.output
    record = json.loads((tmp_path / "out" / "deltamerge-result.json").read_text())
    assert record["signatures"] == [{"folder": "delta", "signed": True, "verified": False}]


def _no_signature(delta: Path) -> str:
    (delta / SIGNATURE_NAME).unlink()
    return "no model.sig"


def _changed(delta: Path) -> str:
    shard = delta / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # a weight's last byte: the delta's digests would fail too, but later
    shard.write_bytes(bytes(data))
    return "not the ones signed: changed: model.safetensors"


def _added(delta: Path) -> str:
    (delta / "added.py").write_text("print('hello')\n")
    return "not the ones signed: added: added.py"


def _removed(delta: Path) -> str:
    (delta / "tokenizer_config.json").unlink()
    return "not the ones signed: removed: tokenizer_config.json"


@pytest.mark.parametrize("tamper", [_no_signature, _changed, _added, _removed])
def test_a_tampered_delta_is_refused_before_any_weight_is_read(made, tmp_path, tamper,
                                                               no_weights_read):
    delta = copy_delta(made, tmp_path)
    words = tamper(delta)
    out = tmp_path / "out"
    refused(invoke("apply", made.base, delta, out, "--signer-key", made.alice.public),
            str(delta), words)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["delta"]


def test_a_delta_signed_by_another_key_is_refused(made, tmp_path, no_weights_read):
    out = tmp_path / "out"
    refused(invoke("apply", made.base, made.delta, out, "--signer-key", made.mallory.public),
            str(made.delta), "does not check against the pinned key")
    assert not out.exists()


def test_verify_checks_the_manifests_folder_before_hashing(made, tmp_path):
    rebuilt = tmp_path / "rebuilt"
    assert invoke("apply", made.base, made.delta, rebuilt, "-q").exit_code == 0
    ok = invoke("verify", rebuilt, "--manifest", made.delta, "--signer-key", made.alice.public)
    assert ok.exit_code == 0, ok.output
    assert f"signed   key {made.alice.fingerprint} (verified" in ok.output
    as_json = invoke("verify", rebuilt, "--manifest", made.delta / "deltamerge.json",
                     "--signer-key", made.alice.public, "--json", "-q")
    assert json.loads(as_json.output)["signature"]["signer"] == made.alice.fingerprint
    refused(invoke("verify", rebuilt, "--manifest", made.delta, "--signer-key",
                   made.mallory.public), "does not check against the pinned key")
    delta = copy_delta(made, tmp_path)
    manifest = json.loads((delta / "deltamerge.json").read_text())
    (delta / "deltamerge.json").write_text(json.dumps(manifest, indent=4))  # same content, new bytes
    refused(invoke("verify", rebuilt, "--manifest", delta, "--signer-key", made.alice.public),
            "not the ones signed: changed: deltamerge.json")


def test_sign_writes_what_the_model_signing_tool_accepts(made, tmp_path):
    folder = save_checkpoint(llama_state(2), tmp_path / "model")
    result = invoke("sign", folder, "--key", made.alice.private)
    assert result.exit_code == 0, result.output
    assert made.alice.fingerprint in result.output
    signature = folder / SIGNATURE_NAME

    def stock(public: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "model_signing", "verify", "key", str(folder), "--signature",
             str(signature), "--public_key", str(public)],
            capture_output=True, text=True, timeout=120,
        )

    accepted = stock(made.alice.public)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert stock(made.mallory.public).returncode != 0
    assert verify_folder(folder, SignerPin(key=made.alice.public)).identity == made.alice.fingerprint


def test_a_certificate_chain_is_checked_with_the_pinned_root_and_name(made, tmp_path, monkeypatch):
    chain, delta = made.chain, made.cert_delta
    for pinned in (LEAF_NAME, "Alice Publisher"):  # the RFC 4514 subject, or its common name
        out = tmp_path / f"out-{len(pinned)}"
        result = invoke("apply", made.base, delta, out, "--signer-root", chain.root,
                        "--signer-name", pinned)
        assert result.exit_code == 0, result.output
        assert f"signed    by certificate {LEAF_NAME} (verified)" in result.output
        record = json.loads((out / "deltamerge-result.json").read_text())
        assert record["signatures"][0]["signer"] == LEAF_NAME

    def opened(*args, **kwargs):
        raise AssertionError("a checkpoint was opened before the signature refused")

    monkeypatch.setattr(deltamerge.apply, "open_checkpoint", opened)
    out = tmp_path / "refused"
    for args, words in [
        (("--signer-root", chain.root, "--signer-name", "Mallory"), "not by the pinned signer"),
        (("--signer-root", chain.root, "--signer-name", "CN=Alice Publisher"),
         "not by the pinned signer"),
        (("--signer-root", made.other.root, "--signer-name", LEAF_NAME),
         "does not check against the pinned root"),  # another root, with the same names
        (("--signer-key", made.alice.public), "does not check against the pinned key"),
        (("--signer-root", chain.root), "--signer-root needs --signer-name"),
    ]:
        refused(invoke("apply", made.base, delta, out, *args), *words.split("|"))
        assert not out.exists()
    refused(invoke("apply", made.base, made.delta, out, "--signer-root", chain.root,
                   "--signer-name", LEAF_NAME), "not signed with a certificate")


def test_signing_options_are_checked_before_the_run(made, tmp_path):
    out = tmp_path / "out"
    refused(invoke("make-delta", made.base, made.target, out, "--sign-key", made.chain.key,
                   "--sign-cert", made.chain.leaf), "--sign-cert needs --sign-chain")
    refused(invoke("make-delta", made.base, made.target, out, "--sign-key",
                   made.alice.public), "not a PEM EC private key")
    refused(invoke("apply", made.base, made.delta, out, "--signer-key", made.alice.public,
                   "--signer-name", "x"), "goes with --signer-root")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_without_the_package_only_signatures_need_it(made, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "model_signing", None)  # import model_signing fails
    assert check_folder(made.delta, None).signed  # no pin: nothing to import
    with pytest.raises(InputError, match=r"pip install 'deltamerge\[sign\]'"):
        verify_folder(made.delta, SignerPin(key=made.alice.public))


def test_push_uploads_the_signature_and_a_hub_delta_is_checked(hub, made, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", DEFAULT_TOKEN)
    pushed = invoke("push", made.delta, "alice/signed-delta", "-q")
    assert pushed.exit_code == 0, pushed.output
    assert hub.files("alice/signed-delta")[SIGNATURE_NAME] == (made.delta / SIGNATURE_NAME).read_bytes()
    clone = Path(shutil.copytree(made.delta, tmp_path / "clone"))  # the repo as git clones it
    for name, data in hub.files("alice/signed-delta").items():
        (clone / name).write_bytes(data)  # with the card push wrote, and .gitattributes
    assert {"README.md", ".gitattributes"} <= {p.name for p in clone.iterdir()}
    assert verify_folder(clone, SignerPin(key=made.alice.public)).identity == made.alice.fingerprint
    out = tmp_path / "out"
    result = invoke("apply", made.base, "alice/signed-delta", out, "--signer-key",
                    made.alice.public)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "deltamerge-result.json").read_text())
    assert record["signatures"][0]["signer"] == made.alice.fingerprint
    refused(invoke("apply", made.base, "alice/signed-delta", tmp_path / "out2", "--signer-key",
                   made.mallory.public), "does not check against the pinned key")


def test_sigstore_pins_identity_and_issuer(made, tmp_path, monkeypatch):
    """At the package's boundary: its Sigstore configurations (network: OIDC, Fulcio, Rekor) are
    stood in for by its key signer and verifier; what deltamerge passes them is checked."""
    import model_signing.signing
    import model_signing.verifying

    calls: dict[str, list] = {"sign": [], "verify": []}
    trusted = {"key": made.alice.public}

    def signer(self, **kwargs):
        calls["sign"].append(kwargs)
        return self.use_elliptic_key_signer(private_key=made.alice.private)

    def verifier(self, **kwargs):
        calls["verify"].append(kwargs)
        return self.use_elliptic_key_verifier(public_key=trusted["key"])

    monkeypatch.setattr(model_signing.signing.Config, "use_sigstore_signer", signer)
    monkeypatch.setattr(model_signing.verifying.Config, "use_sigstore_verifier", verifier)
    delta = tmp_path / "delta"
    made_delta = invoke("make-delta", made.base, made.target, delta, "--sign-sigstore")
    assert made_delta.exit_code == 0, made_delta.output
    assert calls["sign"] == [{"use_ambient_credentials": True}]
    pin = ("--signer-identity", "alice@example.com", "--signer-issuer", "https://issuer.example")
    out = tmp_path / "out"
    result = invoke("apply", made.base, delta, out, *pin)
    assert result.exit_code == 0, result.output
    assert calls["verify"] == [{"identity": "alice@example.com",
                                "oidc_issuer": "https://issuer.example"}]
    record = json.loads((out / "deltamerge-result.json").read_text())
    assert record["signatures"][0]["method"] == "sigstore"
    assert record["signatures"][0]["signer"] == "alice@example.com (issuer https://issuer.example)"

    trusted["key"] = made.mallory.public  # Sigstore's check fails: another identity signed
    refused(invoke("apply", made.base, delta, tmp_path / "out2", *pin),
            "does not check against the pinned Sigstore identity")
    refused(invoke("apply", made.base, delta, tmp_path / "out3", *pin[:2]),
            "--signer-identity and --signer-issuer go together")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()
