"""The users-file checker: one PBKDF2 per attempt whether the user exists or not, a bound
on the checks waiting for its threads, and the password schemes of Dovecot it shares."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.testing import MemoryReactorClock

from mtrkmta.auth import (
    DEFAULT_ITERATIONS,
    MAX_CRYPT_ROUNDS,
    MAX_PBKDF2_ITERATIONS,
    ChecksBusy,
    PasswordFileChecker,
    PasswordFileError,
    hash_password,
    hash_sha512_crypt,
    make_hash,
    parse_hash,
    parse_users,
    sha_crypt,
    usual_cost,
    verify_password,
)


class CountingDerive:
    """hashlib.pbkdf2_hmac, noting the iteration count of every call."""

    def __init__(self) -> None:
        self.iterations: list[int] = []

    def __call__(self, name: str, password: bytes, salt: bytes, iterations: int) -> bytes:
        self.iterations.append(iterations)
        return hashlib.pbkdf2_hmac(name, password, salt, iterations)


class QueuedPool:
    """The thread-pool side of deferToThreadPool: work waits until ``run`` (no threads)."""

    def __init__(self) -> None:
        self.queue: list[tuple] = []

    def callInThreadWithCallback(self, on_result, fn, *args, **kwargs):
        self.queue.append((on_result, fn, args, kwargs))

    def run(self) -> None:
        queue, self.queue = self.queue, []
        for on_result, fn, args, kwargs in queue:
            try:
                on_result(True, fn(*args, **kwargs))
            except Exception as error:  # deferToThreadPool hands failures over as Failures
                from twisted.python.failure import Failure

                on_result(False, Failure(error))


class ThreadsReactor(MemoryReactorClock):
    """A fake reactor whose callFromThread runs at once (QueuedPool runs in this thread)."""

    def callFromThread(self, fn, *args, **kwargs):
        fn(*args, **kwargs)


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text(
        f"alice:{hash_password('secret', iterations=1000)}\n"
        f"bob:{hash_password('hunter2', iterations=1000)}\n"
        f"carol:{hash_password('x', iterations=2000)}\n"
    )
    return path


def checker_for(users: Path, derive=hashlib.pbkdf2_hmac, max_pending: int = 16):
    return PasswordFileChecker(
        users, ThreadsReactor(), QueuedPool(), max_pending=max_pending, derive=derive
    )


# -- reproduction 2: no user-enumeration oracle ------------------------------------------------


def test_known_and_unknown_users_cost_one_pbkdf2_of_the_same_iterations(users):
    derive = CountingDerive()
    checker = checker_for(users, derive)
    with pytest.raises(UnauthorizedLogin):
        checker.check(b"alice", b"wrong")
    known = list(derive.iterations)
    derive.iterations.clear()
    with pytest.raises(UnauthorizedLogin):
        checker.check(b"mallory", b"wrong")
    assert known == derive.iterations == [1000]  # the count most users of the file have


def test_the_right_password_costs_one_pbkdf2_too(users):
    derive = CountingDerive()
    assert checker_for(users, derive).check(b"alice", b"secret") == b"alice"
    assert derive.iterations == [1000]


def test_the_dummy_hash_follows_the_file(users):
    derive = CountingDerive()
    checker = checker_for(users, derive)
    users.write_text(f"alice:{hash_password('secret', iterations=3000)}\n")
    with pytest.raises(UnauthorizedLogin):
        checker.check(b"mallory", b"secret")
    assert derive.iterations == [3000]


def test_the_dummy_hash_matches_no_password(users):
    checker = checker_for(users)
    dummy = checker.dummy_hash([])
    assert dummy.startswith(f"pbkdf2-sha256${DEFAULT_ITERATIONS}$")
    assert dummy != hash_password("", salt=b"\0" * 16)  # no longer a hash of a known password
    assert checker_for(users).dummy_hash([]) != dummy  # random per checker


def test_usual_cost():
    five, seven = (hash_password("x", iterations=n) for n in (5, 7))
    assert usual_cost([]) == ("pbkdf2-sha256", DEFAULT_ITERATIONS)
    assert usual_cost([five, seven]) == ("pbkdf2-sha256", 7)
    assert usual_cost([five] * 2 + [seven]) == ("pbkdf2-sha256", 5)


# -- reproduction 3: a bound on the checks waiting for the checker's threads --------------------


def test_checks_beyond_max_pending_fail_at_once_until_some_finish(users):
    checker = checker_for(users, max_pending=2)
    pool = checker.threadpool
    results: list[object] = []
    for _ in range(3):
        d = checker.requestAvatarId(UsernamePassword(b"alice", b"secret"))
        d.addBoth(results.append)
    assert results[0].check(ChecksBusy)  # the third failed at once
    assert checker.pending == 2
    pool.run()
    assert results[1:] == [b"alice", b"alice"]
    assert checker.pending == 0
    d = checker.requestAvatarId(UsernamePassword(b"alice", b"wrong"))
    d.addBoth(results.append)
    pool.run()
    assert results[-1].check(UnauthorizedLogin)
    assert checker.pending == 0


# -- Dovecot's schemes: SHA-crypt (Drepper's specification), SSHA, PBKDF2 ----------------------

LONG_TEXT = "a very much longer text to encrypt.  This one even stretches over morethan one line."
SHORT_SALT_TEXT = "we have a short salt string but not a short password"
ROUNDS_TEXT = "the minimum number is still observed"

# The test vectors of "Unix crypt using SHA-256 and SHA-512" (Ulrich Drepper), but for the
# two with 77777 and 123456 rounds, left out only to keep the unit tests quick.
SHA512_VECTORS = [
    (
        "$6$saltstring",
        "Hello world!",
        "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJu"
        "esI68u4OTLiBFdcbYEdFCoEOfaS35inz1",
    ),
    (
        "$6$rounds=10000$saltstringsaltstring",
        "Hello world!",
        "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sb"
        "HbbMCVNSnCM/UrjmM0Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v.",
    ),
    (
        "$6$rounds=5000$toolongsaltstring",
        "This is just a test",
        "$6$rounds=5000$toolongsaltstrin$lQ8jolhgVRVhY4b5pZKaysCLi0QBxGoNeKQ"
        "zQ3glMhwllF7oGDZxUhx1yxdYcz/e1JSbq3y6JMxxl8audkUEm0",
    ),
    (
        "$6$rounds=1400$anotherlongsaltstring",
        LONG_TEXT,
        "$6$rounds=1400$anotherlongsalts$POfYwTEok97VWcjxIiSOjiykti.o/pQs.wP"
        "vMxQ6Fm7I6IoYN3CmLs66x9t0oSwbtEW7o7UmJEiDwGqd8p4ur1",
    ),
    (
        "$6$rounds=10$roundstoolow",
        ROUNDS_TEXT,
        "$6$rounds=1000$roundstoolow$kUMsbe306n21p9R.FRkW3IGn.S9NPN0x50YhH1x"
        "hLsPuWGsUSklZt58jaTfF4ZEQpyUNGc0dqbpBYYBaHHrsX.",
    ),
]
SHA256_VECTORS = [
    ("$5$saltstring", "Hello world!", "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5"),
    (
        "$5$rounds=10000$saltstringsaltstring",
        "Hello world!",
        "$5$rounds=10000$saltstringsaltst$3xv.VbSHBb41AL9AvLeujZkZRBAwqFMz2.opqey6IcA",
    ),
    (
        "$5$rounds=5000$toolongsaltstring",
        "This is just a test",
        "$5$rounds=5000$toolongsaltstrin$Un/5jzAHMgOGZ5.mWJpuVolil07guHPvOW8mGRcvxa5",
    ),
    (
        "$5$rounds=1400$anotherlongsaltstring",
        LONG_TEXT,
        "$5$rounds=1400$anotherlongsalts$Rx.j8H.h8HjEDGomFU8bDkXm3XIUnzyxf12oP84Bnq1",
    ),
    (
        "$5$rounds=10$roundstoolow",
        ROUNDS_TEXT,
        "$5$rounds=1000$roundstoolow$yfvwcWrQ8l/K0DAWyuPMDNHpIVlTQebY9l/gL972bIC",
    ),
]


def setting_of(setting: str) -> tuple[bytes, int]:
    """The salt and rounds of a SHA-crypt setting string ``$N$[rounds=R$]SALT``."""
    fields = setting.split("$")[2:]
    rounds = int(fields.pop(0)[len("rounds=") :]) if fields[0].startswith("rounds=") else 5000
    return fields[0].encode(), rounds


@pytest.mark.parametrize(
    ("name", "setting", "password", "expected"),
    [("sha512", *vector) for vector in SHA512_VECTORS]
    + [("sha256", *vector) for vector in SHA256_VECTORS],
)
def test_sha_crypt_gives_the_specification_vectors(name, setting, password, expected):
    salt, rounds = setting_of(setting)
    digest = sha_crypt(name, password.encode(), salt, rounds)
    assert expected.endswith("$" + digest.decode())


@pytest.mark.parametrize(("setting", "password", "expected"), SHA512_VECTORS + SHA256_VECTORS)
def test_the_specification_vectors_verify_as_dovecot_hashes(setting, password, expected):
    scheme = "SHA512-CRYPT" if setting.startswith("$6$") else "SHA256-CRYPT"
    stored = f"{{{scheme}}}{expected}"
    assert verify_password(password.encode(), stored)
    assert not verify_password(password.encode() + b"!", stored)
    assert verify_password(password.encode(), f"{{CRYPT}}{expected}")  # libc crypt(3) form


# Made by `doveadm pw -s SCHEME -p secret` (Dovecot 2.3.19); tests/interop makes fresh ones.
DOVEADM_SECRET = [
    "{SHA512-CRYPT}$6$gpuuIGGP8rYYYW13$unDUVxY6av63RZtSoUZQUi0OPDNTnnYYZRTDx1bknUfcydda3zgBoV"
    ".M2IMzq4PP55rz1xByZNLsbevSeaE84.",
    "{SHA256-CRYPT}$5$/utR3KFfwkFXzyRB$TXYcj38WOkfxXl2KrZD.KPEh5j44xKkITqYU8IvyQW5",
    "{SSHA512}/hNomMvGUUiHEkzXH0mJQ2CnfiFK5ywaqE+oVNRH/SVO2vaGsj2J6H+45bcIMv/orUzj5qf7zVq01Dn9"
    "TAI3kBFU+dw=",
    "{SSHA256}9DOKQ/QUXG22kRPhEEcLqUullAv84N7j3c0ztC15VjGoRD5+",
    "{PBKDF2}$1$abIIHMtrChmfbgRc$5000$d71d371a019fcb32de477411c34477214e1f0e79",
]


@pytest.mark.parametrize("stored", DOVEADM_SECRET)
def test_doveadm_hashes_verify(stored):
    assert verify_password(b"secret", stored)
    assert not verify_password(b"Secret", stored)
    assert not verify_password(b"", stored)


@pytest.mark.parametrize("stored", DOVEADM_SECRET)
def test_a_parsed_hash_writes_back_as_it_was_read(stored):
    assert parse_hash(stored).text() == stored


def test_scheme_names_are_case_insensitive_as_in_dovecot():
    assert verify_password(b"secret", DOVEADM_SECRET[0].replace("SHA512-CRYPT", "sha512-crypt"))


def test_sha512_crypt_hashes_mtrkmta_writes_verify():
    stored = hash_sha512_crypt("pass word", rounds=1000)
    assert stored.startswith("{SHA512-CRYPT}$6$rounds=1000$")
    assert len(parse_hash(stored).salt) == 16
    assert verify_password(b"pass word", stored)
    assert not verify_password(b"pass-word", stored)
    fixed = hash_sha512_crypt("Hello world!", rounds=5000, salt="saltstring")
    assert fixed == "{SHA512-CRYPT}" + SHA512_VECTORS[0][2]  # 5000 rounds go unwritten
    cut = hash_sha512_crypt("Hello world!", rounds=10000, salt="saltstringsaltstring")
    assert cut == "{SHA512-CRYPT}" + SHA512_VECTORS[1][2]  # the salt cut to 16


def test_make_hash_writes_the_two_schemes():
    assert make_hash("x").startswith(f"pbkdf2-sha256${DEFAULT_ITERATIONS}$")
    assert make_hash("x", "SHA512-CRYPT").startswith(f"{{SHA512-CRYPT}}$6$rounds={50_000}$")
    with pytest.raises(ValueError):
        make_hash("x", "SSHA512")


def test_a_matching_password_costs_one_hash_comparison_in_constant_time(monkeypatch):
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    for stored in [*DOVEADM_SECRET, hash_password("secret", iterations=1000)]:
        compared.clear()
        assert verify_password(b"secret", stored)
        assert len(compared) == 1


# -- refusals at load: one line naming the file, the line and the scheme -------------------------


@pytest.mark.parametrize(
    ("stored", "says"),
    [
        ("{PLAIN}secret", "password scheme {PLAIN} (clear text) is refused"),
        ("{CLEARTEXT}secret", "password scheme {CLEARTEXT} (clear text) is refused"),
        (
            "{CRAM-MD5}cd3ba7deaad6e5ca23448ba42e379747a9e0f7f1fbc00c8a81bbaac395731b56",
            "{CRAM-MD5}",
        ),
        ("{MD5}$1$z1AsD6ap$5/jRqTH.UxGEZI1.Ay.mJ/", "password scheme {MD5} is too weak"),
        ("{PLAIN-MD5}5ebe2294ecd0e0f08eab7690d2a6ee69", "password scheme {PLAIN-MD5} is too weak"),
        ("{SHA1}5en6G6MezRroT3XKqkdPOmY/BfQ=", "password scheme {SHA1} is too weak"),
        ("{SHA256}K7gNU3sdo+OL0wNhqoVWhr3g6s1xYv72ol/pe/Unols=", "{SHA256} is too weak"),
        ("{SSHA}IHGuF+QgL7sQPt0a8A89i3SEtmSeFlHz", "password scheme {SSHA} is too weak"),
        ("{CRYPT}$1$XSNKuwAe$SrHNTP66uNHnPoc/esRRY.", "{CRYPT} (MD5-crypt or DES-crypt) is too"),
        (
            "{BLF-CRYPT}$2y$05$4PRz4jsv5tnPaQRJcaPBE.hlf6ZjOh9fdoUopnjAnFagOl7JEr6va",
            "password scheme {BLF-CRYPT} is not supported (mtrkmta knows {SHA512-CRYPT}",
        ),
        (
            "{CRYPT}$2y$05$Up9TnttOpSvnkxjFOp.dau63N.kOODSCbEA0H1eepNXZGlU9Iior.",
            "password scheme {CRYPT} is not supported",
        ),
        ("{SHA512-CRYPT}$6$salt$tooshort", "malformed {SHA512-CRYPT} hash"),
        ("{SHA256-CRYPT}" + SHA512_VECTORS[0][2], "malformed {SHA256-CRYPT} hash"),
        ("{SSHA256}" + "A" * 43 + "=", "malformed {SSHA256} hash: no salt"),
        ("{PBKDF2}$1$salt$5000$nothex", "malformed {PBKDF2} hash"),
        ("pbkdf2-sha256$1000$!!$AAAA", "malformed pbkdf2-sha256 hash"),
        ("$6$saltstring$abc", "expected 'pbkdf2-sha256$...' or a Dovecot hash '{SCHEME}...'"),
    ],
)
def test_refused_hashes_name_the_file_line_and_scheme(stored, says):
    text = f"# users\nalice:{hash_password('secret', iterations=1000)}\nbob:{stored}\n"
    with pytest.raises(PasswordFileError) as caught:
        parse_users(text, "/etc/mtrkmta/users")
    message = str(caught.value)
    assert message.startswith("/etc/mtrkmta/users:3: ")
    assert says in message
    assert message.endswith("; set a new password with 'mtrkmta passwd bob'")
    assert "\n" not in message
    assert not verify_password(b"secret", stored)


def test_a_work_factor_beyond_the_limit_is_refused_at_load():
    setting = f"$6$rounds={MAX_CRYPT_ROUNDS + 1}$saltstring$" + "a" * 86
    with pytest.raises(PasswordFileError, match=r"users:1: .*rounds=1000001 is above"):
        parse_users(f"bob:{{SHA512-CRYPT}}{setting}\n", "users")
    too_many = f"pbkdf2-sha256${MAX_PBKDF2_ITERATIONS + 1}$AAAA$" + "A" * 43 + "="
    with pytest.raises(PasswordFileError, match="iterations=10000001 is above"):
        parse_users(f"bob:{too_many}\n", "users")
    pbkdf2 = f"{{PBKDF2}}$1$salt${MAX_PBKDF2_ITERATIONS + 1}$" + "00" * 20
    with pytest.raises(PasswordFileError, match="rounds=10000001 is above"):
        parse_users(f"bob:{pbkdf2}\n", "users")
    derive = CountingDerive()
    assert not verify_password(b"secret", too_many, derive=derive)
    assert derive.iterations == []  # refused before any work


def test_the_limits_themselves_are_accepted():
    at_limit = f"{{SHA256-CRYPT}}$5$rounds={MAX_CRYPT_ROUNDS}$saltstring$" + "a" * 43
    assert parse_users(f"bob:{at_limit}\n") == {"bob": at_limit}


def test_dovecot_passwd_file_lines_are_read_extra_fields_ignored():
    text = (
        "# shared with Dovecot's passwd-file\n"
        f"alice@example.test:{DOVEADM_SECRET[0]}:1000:1000::/home/alice::userdb_quota_rule=*:5G\n"
        f"bob@example.test:{DOVEADM_SECRET[3]}::::::\n"
        f"carol:{hash_password('x', iterations=1000)}\n"
    )
    users = parse_users(text)
    assert users == {
        "alice@example.test": DOVEADM_SECRET[0],
        "bob@example.test": DOVEADM_SECRET[3],
        "carol": text.splitlines()[3].partition(":")[2],
    }


def test_a_line_without_a_hash_is_refused():
    for line in ("bob", "bob:", ":pbkdf2-sha256$1$a$b", "bob::1000:1000"):
        with pytest.raises(PasswordFileError, match=r"^users:1: expected 'user:pbkdf2-sha256"):
            parse_users(line + "\n", "users")


# -- the dummy hash follows the file's scheme and cost -------------------------------------------


def test_an_unknown_user_costs_what_a_sha512_crypt_user_costs(users):
    users.write_text(
        f"alice:{hash_sha512_crypt('secret', rounds=2000)}\n"
        f"bob:{hash_sha512_crypt('hunter2', rounds=2000)}\n"
        f"carol:{hash_password('x', iterations=1000)}\n"
    )
    derive = CountingDerive()
    checker = checker_for(users, derive)
    dummy = parse_hash(checker.dummy_hash(parse_users(users.read_text()).values()))
    assert (dummy.scheme, dummy.cost, len(dummy.salt)) == ("SHA512-CRYPT", 2000, 16)
    with pytest.raises(UnauthorizedLogin):
        checker.check(b"mallory", b"secret")
    assert derive.iterations == []  # no PBKDF2: the dummy was a SHA-crypt, as alice's is
    assert checker.check(b"alice", b"secret") == b"alice"
    assert checker.check(b"carol", b"x") == b"carol"
    assert derive.iterations == [1000]


@pytest.mark.parametrize("stored", DOVEADM_SECRET)
def test_the_dummy_hash_is_well_formed_in_every_scheme_and_matches_nothing(users, stored):
    checker = checker_for(users)
    dummy = checker.dummy_hash([stored])
    assert parse_hash(dummy).scheme == parse_hash(stored).scheme
    assert parse_hash(dummy).cost == parse_hash(stored).cost
    assert not verify_password(b"secret", dummy)
    assert not verify_password(b"", dummy)


def test_check_config_names_a_refused_scheme(tmp_path, capsys):
    from mtrkmta.cli.main import main

    users = tmp_path / "users"
    users.write_text(
        f"alice:{DOVEADM_SECRET[0]}\nbob:{{PLAIN-MD5}}5ebe2294ecd0e0f08eab7690d2a6ee69\n"
    )
    config = tmp_path / "mtrkmta.toml"
    config.write_text(f'[auth]\nusers_file = "{users}"\n')
    assert main(["check-config", str(config)]) == 2
    assert capsys.readouterr().err == (
        f"mtrkmta: {config}: auth.users_file {users}:2: password scheme {{PLAIN-MD5}} is too "
        "weak and refused; set a new password with 'mtrkmta passwd bob'\n"
    )
