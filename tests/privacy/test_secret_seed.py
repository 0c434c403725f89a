"""The randomness DP rests on (the noise share, DP-SGD's sampling and noise) comes from the
client's private key and its seed: a rerun with the same identity repeats it, while anyone who
knows the seed (it defaults to 0) but not the key cannot."""

from types import SimpleNamespace

from swarmlm.p2p.identity import Identity
from swarmlm.privacy.participant import Participant


def participant(identity: Identity, seed: int | None) -> Participant:
    return Participant(SimpleNamespace(identity=identity), run_id="r", data="", data_dir=None, seed=seed,
                       printer=lambda s: None)


def test_the_noise_seed_is_the_key_holders_alone():
    start = SimpleNamespace(round=3, attempt=0)
    me, other = Identity.generate(), Identity.generate()
    mine = participant(me, seed=0)._secret_seed(start, "noise share")
    assert mine == participant(me, seed=0)._secret_seed(start, "noise share")          # reproducible for me
    assert mine != participant(other, seed=0)._secret_seed(start, "noise share")       # a known seed gives nothing
    assert mine != participant(me, seed=0)._secret_seed(start, "dp-sgd noise")         # one stream per purpose
    assert mine != participant(me, seed=0)._secret_seed(SimpleNamespace(round=4, attempt=0), "noise share")
    assert participant(me, seed=None)._secret_seed(start, "noise share") is None       # no seed: fresh entropy
