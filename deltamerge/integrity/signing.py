"""Signatures of whole folders in the OpenSSF Model Signing format (OMS v1.0), ``model.sig``.

A delta's manifest proves what apply rebuilt, but anyone who can replace the delta can replace
its manifest too: a signature says who published the folder. The format is the one NVIDIA NGC,
IBM Granite and the ``model_signing`` tool write and check: a Sigstore bundle beside the files,
whose statement lists every file's sha256. It is made and checked by the ``model-signing``
package (the ``sign`` extra), imported only here and only when a signature is made or checked,
so nothing else needs it installed.

Trust comes from the pin the user gives, never from the folder: a public key (``--signer-key``),
or a certificate root plus the leaf's subject (``--signer-root`` with ``--signer-name``; the
package's certificate check accepts any leaf its root issued, so the subject is pinned here).
Each check builds its own ``model_signing`` configurations (a reused one accumulates ignored
paths), names the signature file as ignored (the package does not), never uses its
``ignore_unsigned_files`` (which reads paths the signature names, ``../`` included), and allows
symlinks only in a Hub cache snapshot (whose files are links into ``blobs/``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, SignatureError, WorkError

SIGNATURE_NAME = "model.sig"
INSTALL_HINT = "pip install 'deltamerge[sign]'"


@dataclass(frozen=True)
class SigningKey:
    """What a publisher signs with: an EC private key, and for a certificate signer its
    certificate and the chain up to the root (the package needs at least one chain file); or
    ``sigstore``: a short-lived Fulcio certificate for the signer's OIDC identity (ambient
    credentials in CI, else the browser flow), logged in Rekor (needs the network)."""

    key: Path | None = None
    cert: Path | None = None
    chain: tuple[Path, ...] = ()
    sigstore: bool = False

    def __post_init__(self) -> None:
        if (self.key is None) != self.sigstore:
            raise InputError("sign with one of a key (--sign-key) and Sigstore (--sign-sigstore)")
        if self.cert is not None and not self.chain:
            raise InputError("--sign-cert needs --sign-chain: the certificates up to the root")
        if self.cert is None and self.chain:
            raise InputError("--sign-chain goes with --sign-cert: a bare key signs without a chain")


@dataclass(frozen=True)
class SignerPin:
    """What the consumer trusts, from another channel than the folder: a public key, or a
    certificate root and the leaf's subject (an RFC 4514 string when it holds ``=``, e.g.
    ``CN=Alice,O=Example``; otherwise the leaf's common name); or a Sigstore identity (the
    certificate's email or URI) and the OIDC issuer that vouched for it, both required, checked
    against Sigstore's public trust root."""

    key: Path | None = None
    root: Path | None = None
    name: str | None = None
    identity: str | None = None
    issuer: str | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.key, self.root, self.identity)) != 1:
            raise InputError("give one of --signer-key, --signer-root and --signer-identity")
        if (self.identity is None) != (self.issuer is None):
            raise InputError("--signer-identity and --signer-issuer go together: Sigstore vouches "
                             "for an identity as one issuer saw it")
        if self.root is not None and not self.name:
            raise InputError("--signer-root needs --signer-name: the root vouches for every "
                             "certificate it issued, the name says which one signs")
        if self.key is not None and self.name:
            raise InputError("--signer-name pins a certificate's subject: it goes with --signer-root")


@dataclass(frozen=True)
class Signer:
    """Who signed a folder: ``method`` "key" (``identity`` the public key's fingerprint, sha256
    of its DER SubjectPublicKeyInfo), "certificate" (``identity`` the leaf's RFC 4514 subject)
    or "sigstore" (the pinned identity and issuer); ``verified`` when checked against a pin."""

    method: str
    identity: str
    verified: bool = True

    def describe(self) -> str:
        return f"{self.method} {self.identity}"

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "signer": self.identity, "verified": self.verified}


@dataclass
class SignatureCheck:
    """A folder's signature as a run met it: ``signer`` when it was checked, else whether one
    was there at all (a signed folder applied without a pin is said to be unchecked)."""

    folder: Path
    signed: bool
    signer: Signer | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        if self.signer is not None:
            return self.signer.to_json()
        return {"signed": self.signed, "verified": False}


def check_signing_key(signing: SigningKey) -> None:
    """Before a long run that ends in a signature: the package is installed and the files load."""
    _package()
    if signing.sigstore:
        return
    _private_key(_need(signing.key, "--sign-key"))
    for path in (signing.cert, *signing.chain):
        if path is not None:
            _need(path, "--sign-cert/--sign-chain")


def sign_folder(folder: Path, signing: SigningKey, *, ignore: tuple[str, ...] = ()) -> Signer:
    """Write ``folder/model.sig`` over every file of ``folder`` (sha256 each, as the format
    requires), but ``ignore`` (top-level names) and git's files.

    The signature is made in a scratch folder and renamed in, so a failed run leaves no
    half-written one (and no ``model.sig`` that a check would then ignore as its own).
    """
    ms = _package()
    folder = Path(folder)
    check_signing_key(signing)
    config = ms.signing.Config()
    try:
        if signing.sigstore:
            config.use_sigstore_signer(use_ambient_credentials=True)
        elif signing.cert is None:
            config.use_elliptic_key_signer(private_key=signing.key)
        else:
            config.use_certificate_signer(private_key=signing.key, signing_certificate=signing.cert,
                                          certificate_chain=list(signing.chain))
        config.set_hashing_config(_hashing(ms, (SIGNATURE_NAME, *ignore), symlinks=False))
        with tempfile.TemporaryDirectory(prefix="deltamerge-sign-") as scratch:
            made = Path(scratch) / SIGNATURE_NAME
            config.sign(folder, made)
            data = made.read_bytes()
    except Exception as exc:  # Sigstore's network, OIDC and log errors, the key's ValueError
        if signing.sigstore:  # the folder is complete: a run kept for --resume can sign it again
            raise WorkError(f"{folder}: Sigstore could not sign: {_first_line(exc)}") from None
        raise InputError(f"{folder}: cannot sign: {_first_line(exc)}") from None
    part = folder / f".{SIGNATURE_NAME}.partial"
    part.write_bytes(data)
    os.replace(part, folder / SIGNATURE_NAME)
    if signing.sigstore:
        return Signer("sigstore", _sigstore_identity(data))
    if signing.cert is None:
        return Signer("key", _fingerprint(_private_key(signing.key).public_key()))
    return Signer("certificate", _subject(_leaf(data)))


def check_folder(folder: Path, pin: SignerPin | None, *, symlinks: bool = False) -> SignatureCheck:
    """The folder's signature checked against ``pin``, or (no pin) only whether it has one."""
    folder = Path(folder)
    if pin is None:
        signed = (folder / SIGNATURE_NAME).is_file()
        notes = [f"{folder} is signed ({SIGNATURE_NAME}) but its signature was not checked: give "
                 "--signer-key or --signer-root to check it"] if signed else []
        return SignatureCheck(folder, signed, notes=notes)
    return SignatureCheck(folder, True, verify_folder(folder, pin, symlinks=symlinks))


def verify_folder(folder: Path, pin: SignerPin, *, symlinks: bool = False) -> Signer:
    """Check ``folder/model.sig`` against ``pin`` and every file of the folder against it
    (one changed, added or removed fails); ``symlinks`` only for a Hub cache snapshot.

    The signature's bytes are read once: the pinned subject and the package's check are of the
    same bytes, copied to a scratch file, whatever happens to ``model.sig`` meanwhile.
    """
    folder = Path(folder)
    sig = folder / SIGNATURE_NAME
    if not sig.is_file() or (sig.is_symlink() and not symlinks):
        what = "a symlink, not a file" if sig.is_symlink() else "the folder is not signed"
        raise SignatureError(f"{folder}: no {SIGNATURE_NAME} ({what}), and a signer was pinned")
    ms = _package()
    data = sig.read_bytes()
    if pin.key is not None:
        _need(pin.key, "--signer-key")
        signer = Signer("key", _fingerprint(_public_key(pin.key)))
    elif pin.identity is not None:
        signer = Signer("sigstore", f"{pin.identity} (issuer {pin.issuer})")
    else:
        _need(pin.root, "--signer-root")
        signer = Signer("certificate", _pinned_subject(folder, data, pin.name or ""))
    config = ms.verifying.Config()  # a new one per check: ignored paths accumulate on a reused one
    try:
        if pin.key is not None:
            config.use_elliptic_key_verifier(public_key=pin.key)
        elif pin.identity is not None:
            config.use_sigstore_verifier(identity=pin.identity, oidc_issuer=pin.issuer)
        else:
            config.use_certificate_verifier(certificate_chain=[pin.root])
        config.set_hashing_config(_hashing(ms, (SIGNATURE_NAME,), symlinks=symlinks))
        with tempfile.TemporaryDirectory(prefix="deltamerge-verify-") as scratch:
            copy = Path(scratch) / SIGNATURE_NAME
            copy.write_bytes(data)
            config.verify(folder, copy)
    except Exception as exc:  # the package raises ValueError, InvalidSignature, OpenSSL errors
        files = _files_at_fault(str(exc))
        if files:
            raise SignatureError(f"{folder}: the files are not the ones signed: {files}") from None
        raise SignatureError(f"{folder}: the signature does not check against the pinned "
                             f"{_pinned(pin)}: {_first_line(exc)}") from None
    return signer


def _pinned(pin: SignerPin) -> str:
    return "key" if pin.key else "root" if pin.root else "Sigstore identity"


def _sigstore_identity(data: bytes) -> str:
    """The email or URI a Sigstore bundle's Fulcio certificate was issued to, for the summary
    (what a verifier pins with --signer-identity)."""
    from cryptography import x509

    try:
        raw = json.loads(data)["verificationMaterial"]["certificate"]["rawBytes"]
        cert = x509.load_der_x509_certificate(base64.b64decode(raw))
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return str(next(iter(names)).value)
    except (ValueError, KeyError, TypeError, StopIteration, x509.ExtensionNotFound):
        return "a Sigstore certificate"


def _files_at_fault(message: str) -> str:
    """The package's list of differences (digests as Python reprs) as one short line: which
    files changed, were added or were removed since signing; empty for other failures."""
    if not message.startswith("Signature mismatch"):
        return ""
    message = message.replace("\\'", "'")
    changed = re.findall(r"Hash mismatch for '([^']*)'", message)
    added = re.findall(r"Extra files found in model '[^']*': ([^\]\"]*)", message)
    removed = re.findall(r"Missing files in model '[^']*': ([^\]\"]*)", message)
    parts = [f"{what}: {', '.join(names)}" for what, names in
             (("changed", changed), ("added", added), ("removed", removed)) if names]
    return "; ".join(parts)


def _pinned_subject(folder: Path, data: bytes, name: str) -> str:
    """The leaf certificate's subject, refused unless it is the pinned name."""
    leaf = _leaf(data, folder)
    subject, common = _subject(leaf), _common_names(leaf)
    if (subject != name) if "=" in name else (common != [name]):
        raise SignatureError(f"{folder}: signed by {subject!r}, not by the pinned signer {name!r}")
    return subject


def _leaf(data: bytes, folder: Path | None = None):
    """The signing certificate a bundle carries (first of its chain), as the format places it."""
    from cryptography import x509

    try:
        bundle = json.loads(data)
        raw = bundle["verificationMaterial"]["x509CertificateChain"]["certificates"][0]["rawBytes"]
        return x509.load_der_x509_certificate(base64.b64decode(raw))
    except (ValueError, KeyError, IndexError, TypeError):
        raise SignatureError(f"{folder}/{SIGNATURE_NAME}: not signed with a certificate "
                             "(no X.509 chain in the bundle)") from None


def _subject(cert) -> str:
    return cert.subject.rfc4514_string()


def _common_names(cert) -> list[str]:
    from cryptography.x509.oid import NameOID

    return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def _private_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InputError(f"{path}: not a PEM EC private key (unencrypted)")
    return key


def _public_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise InputError(f"{path}: not a PEM EC public key")
    return key


def _fingerprint(public_key) -> str:
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _hashing(ms, ignore: tuple[str, ...], *, symlinks: bool):
    """sha256 per file, the algorithm every verifier must support (the stock CLI's only one)."""
    config = ms.hashing.Config().use_file_serialization(hashing_algorithm="sha256",
                                                        allow_symlinks=symlinks)
    config.set_allow_symlinks(symlinks)  # the serializer's flag is reset from this one at hashing
    return config.set_ignored_paths(paths=list(ignore), ignore_git_paths=True)


def _need(path: Path | None, option: str) -> Path:
    if path is None or not Path(path).is_file():
        raise InputError(f"{path}: no such file ({option})")
    return Path(path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _package():
    """``model_signing``, imported when a signature is made or checked (the ``sign`` extra)."""
    try:
        import model_signing.hashing
        import model_signing.signing
        import model_signing.verifying
    except ImportError as exc:
        raise InputError(f"signatures need the model-signing package ({exc}): {INSTALL_HINT}") from None
    return model_signing
