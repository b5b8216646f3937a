"""Reference-model attacks (LiRA, RMIA, privacy risk score, class thresholds) against independent numpy.

Fleets are seeded synthetic outputs imported into a real store (`robmia-db import`'s path) under one
dataset, so each model is a reference model for the others; every attack runs through the real scoring
path (`score_attacks`) and is compared with `tests/reference_attacks_numpy.py`. The test vectors are those
of shared/docs/reference-attacks.md §§2-6 (worked out from TF Privacy's LiRA code, the RMIA repository and
Song & Mittal's code).
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pytest
import reference_attacks_numpy as ref
from attack_fixtures import SyntheticOutputs, import_synthetic, query
from click.testing import CliRunner
from scipy.stats import norm

from robmia_db.attacks import calibrated
from robmia_db.attacks import fleet as fleet_module
from robmia_db.attacks.nested_calibration import TOO_FEW_NOTE
from robmia_db.attacks.scoring import score_attacks
from robmia_db.cli import main
from robmia_db.store.signals import signals_from_logits, signals_from_probs

LIRA = ("lira_online", "lira_offline")
SINGLE = ("lira_online", "lira_offline", "rmia_offline", "rmia_online", "risk_score", "class_thresholds")
JOINT = ("lira_online_joint", "lira_offline_joint", "lira_online_joint_verified")
PERTURBATIONS = ("benign", "pgd", "ver")


@dataclass
class Fleet:
    db: Path
    keys: list[str]  # model keys, in fleet order
    labels: np.ndarray
    members: np.ndarray  # [M, N]
    logits: dict[str, np.ndarray]  # perturbation -> [M, N, C] float32


def fleet_outputs(
    seed: int, n_models: int, n: int = 160, n_classes: int = 4
) -> tuple[dict, np.ndarray, dict]:
    """Models on independent random halves of the same examples; each example has its own difficulty (so
    per-example calibration matters), and a tenth are so easy that float32 p_y saturates at 1.0."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    difficulty = rng.normal(0.0, 1.5, n) + np.where(np.arange(n) < n // 10, 25.0, 0.0)
    rows = np.arange(n)
    outputs, members, logits = {}, [], {p: [] for p in PERTURBATIONS}
    for i in range(n_models):
        member = rng.permutation(np.arange(n) < n // 2)
        benign = rng.normal(0.0, 1.0, (n, n_classes))
        gap = 3.0 + difficulty + 1.2 * member + rng.normal(0.0, 0.7, n)
        benign[rows, labels] = benign.max(axis=1) + gap
        pgd = benign.copy()
        pgd[rows, labels] -= 2.0 + 1.0 * ~member + rng.normal(0.0, 0.5, n)
        verified = -np.abs(rng.normal((1.0 + ~member)[:, None], 0.5, (n, n_classes)))
        verified[rows, labels] = 0.0
        model_logits = {"benign": benign, "pgd": pgd, "ver": verified}
        model_logits = {k: v.astype(np.float32) for k, v in model_logits.items()}
        outputs[f"m{i}"] = SyntheticOutputs(
            labels, member, model_logits, example_id=np.arange(500, 500 + n),
            kinds={"pgd": "adversarial", "ver": "verified"},
        )  # fmt: skip
        members.append(member)
        for name in PERTURBATIONS:
            logits[name].append(model_logits[name])
    return outputs, np.array(members), {k: np.array(v) for k, v in logits.items()}


def make_fleet(folder: Path, seed: int, n_models: int, **kwargs) -> Fleet:
    outputs, members, logits = fleet_outputs(seed, n_models, **kwargs)
    db = folder / "fleet.duckdb"
    keys = import_synthetic(db, folder / "npz", outputs, dataset="fleet")
    labels = next(iter(outputs.values())).labels
    return Fleet(db, [keys[f"m{i}"] for i in range(n_models)], labels, members, logits)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Fleet:
    fleet = make_fleet(tmp_path_factory.mktemp("fleet"), seed=3, n_models=6)
    outcomes = score_attacks(fleet.db, [*SINGLE, *JOINT])
    assert all(o.skipped == [] for o in outcomes), [o.skipped for o in outcomes]
    return fleet


def stored(db: Path, attack: str, key: str, perturbation: str) -> np.ndarray:
    rows = query(
        db,
        "SELECT score FROM v_scores WHERE attack = $a AND model_key = $k AND perturbation = $p ORDER BY example_id",
        a=attack, k=key, p=perturbation,
    )  # fmt: skip
    return np.array([r["score"] for r in rows])


def phi_fleet(fleet: Fleet, perturbation: str) -> np.ndarray:
    return np.array([ref.phi_from_logits(z, fleet.labels) for z in fleet.logits[perturbation]])


# --- the signal -------------------------------------------------------------------------------------------


def test_confidence_logit_is_finite_and_exact_where_float32_confidence_saturates(fleet: Fleet):
    rows = query(
        fleet.db,
        "SELECT example_id, confidence, confidence_logit FROM v_signals WHERE model_key = $k AND perturbation = 'benign' "
        "ORDER BY example_id",
        k=fleet.keys[0],
    )
    confidence = np.array([r["confidence"] for r in rows], dtype=np.float32)
    phi = np.array([r["confidence_logit"] for r in rows])
    saturated = confidence == np.float32(1.0)
    assert saturated.sum() >= 10  # the easy tenth
    expected = ref.phi_from_logits(fleet.logits["benign"][0], fleet.labels)
    np.testing.assert_allclose(phi, expected, rtol=1e-13, atol=1e-12)
    assert np.all(np.isfinite(phi[saturated])) and np.all(phi[saturated] > 16)
    assert np.unique(phi[saturated]).size == saturated.sum()  # no ties where confidence ties at 1.0f


def test_confidence_logit_test_vectors():
    """reference-attacks.md §2: TF Privacy's `calculate_statistic(option='logit')` vectors."""
    logits = np.array([[1, 2, -3], [-1, 1, 0]], np.float32)
    got = signals_from_logits(logits, np.array([1, 2]))["confidence_logit"]
    np.testing.assert_allclose(got, [0.98185009, -1.12692802], rtol=0, atol=5e-8)
    probs = np.array([[0.1, 0.85, 0.05], [0.1, 0.5, 0.4]], np.float32)
    got = signals_from_probs(probs, np.array([1, 2]))["confidence_logit"]
    np.testing.assert_allclose(got, [1.73460106, -0.40546511], rtol=0, atol=5e-7)  # float32 inputs
    # p_y = 1.0f in float32, logits 40 apart: the exact value, where any epsilon-based form would saturate
    big = signals_from_logits(np.array([[40.0, 0.0, 0.0]], np.float32), np.array([0]))["confidence_logit"]
    assert big[0] == pytest.approx(40.0 - np.log(2.0), abs=1e-12)


def test_older_stores_without_confidence_logit_fall_back_to_probs(fleet: Fleet, tmp_path: Path):
    """A NULL confidence_logit (stores before the column) is computed from the float32 probabilities as
    the reference code does; scores stay within the float32 rounding of the probabilities."""
    db = tmp_path / "old.duckdb"
    shutil.copy2(fleet.db, db)
    with duckdb.connect(str(db)) as con:
        con.execute("UPDATE signals SET confidence_logit = NULL")
    score_attacks(db, ["lira_online"], force=True)
    for key in fleet.keys[:2]:
        np.testing.assert_allclose(
            stored(db, "lira_online", key, "benign"),
            stored(fleet.db, "lira_online", key, "benign"),
            atol=1e-3,
        )


# --- every attack against numpy on the fleet --------------------------------------------------------------


@pytest.mark.parametrize("location", ["median", "mean"])
@pytest.mark.parametrize("variance", ["global", "per_example"])
def test_lira_equals_numpy(fleet: Fleet, tmp_path: Path, location: str, variance: str):
    db = tmp_path / "fleet.duckdb"
    shutil.copy2(fleet.db, db)
    params = {"location": location, "variance": variance}
    # parameters other than the defaults make variants stored under their own names, e.g. lira_online[location=mean]
    names = {o.attack.base_name: o.attack.name for o in score_attacks(db, list(LIRA), params=params)}
    for perturbation in PERTURBATIONS:
        phi = phi_fleet(fleet, perturbation)
        for t, key in enumerate(fleet.keys):
            for attack in LIRA:
                expected = ref.lira(phi, fleet.members, t, attack.split("_")[1], location, variance)
                np.testing.assert_allclose(
                    stored(db, names[attack], key, perturbation), expected, rtol=1e-9, atol=1e-9
                )


def test_joint_lira_sums_online_llrs_and_averages_offline_z(fleet: Fleet):
    phis = {p: phi_fleet(fleet, p) for p in PERTURBATIONS}
    for t, key in enumerate(fleet.keys):
        llr = {p: ref.lira(phis[p], fleet.members, t, "online") for p in PERTURBATIONS}
        z = {p: ref.lira(phis[p], fleet.members, t, "offline") for p in PERTURBATIONS}
        np.testing.assert_allclose(
            stored(fleet.db, "lira_online_joint", key, "pgd"), llr["benign"] + llr["pgd"], rtol=1e-9
        )
        np.testing.assert_allclose(
            stored(fleet.db, "lira_online_joint_verified", key, "ver"),
            llr["benign"] + llr["pgd"] + llr["ver"],
            rtol=1e-9,
        )
        np.testing.assert_allclose(
            stored(fleet.db, "lira_offline_joint", key, "pgd"), (z["benign"] + z["pgd"]) / 2, rtol=1e-9
        )


def test_rmia_equals_numpy_cross_join(fleet: Fleet):
    for perturbation in PERTURBATIONS:
        p_true = np.exp(np.array([ref.log_p_true(z, fleet.labels) for z in fleet.logits[perturbation]]))
        for t, key in enumerate(fleet.keys):
            offline = ref.rmia(p_true, fleet.members, t, "offline", gamma=2.0, a=0.3)
            online = ref.rmia(p_true, fleet.members, t, "online", gamma=2.0)
            np.testing.assert_allclose(
                stored(fleet.db, "rmia_offline", key, perturbation), offline, rtol=0, atol=1e-15
            )
            np.testing.assert_allclose(
                stored(fleet.db, "rmia_online", key, perturbation), online, rtol=0, atol=1e-15
            )


def _signal(fleet: Fleet, perturbation: str, column: str) -> np.ndarray:
    rows = query(
        fleet.db,
        f"SELECT {column} AS v FROM v_signals WHERE perturbation = $p ORDER BY model_key, example_id",
        p=perturbation,
    )
    values = np.array([r["v"] for r in rows], dtype=np.float64).reshape(len(fleet.keys), -1)
    return values[np.argsort(np.argsort(fleet.keys))]


def test_risk_score_and_class_thresholds_equal_song_mittal_loops(fleet: Fleet):
    for perturbation in PERTURBATIONS:
        mentropy = _signal(fleet, perturbation, "mentropy")
        confidence = _signal(fleet, perturbation, "CAST(confidence AS DOUBLE)")
        for t, key in enumerate(fleet.keys):
            # Song & Mittal keep the first of tied thresholds: candidates in (model key, example id) order
            others = np.array([i for i in np.argsort(fleet.keys) if i != t])
            risk, thresholds = np.zeros(len(fleet.labels)), np.zeros(len(fleet.labels))
            for label in np.unique(fleet.labels):
                cls = fleet.labels == label
                inside = fleet.members[others][:, cls]
                m_values, c_values = mentropy[others][:, cls], confidence[others][:, cls]
                risk[cls] = ref.risk_posterior(m_values[inside], m_values[~inside], mentropy[t, cls])
                thresholds[cls] = confidence[t, cls] - ref.thre_setting(c_values[inside], c_values[~inside])
            np.testing.assert_array_equal(stored(fleet.db, "risk_score", key, perturbation), risk)
            np.testing.assert_array_equal(stored(fleet.db, "class_thresholds", key, perturbation), thresholds)


def test_lira_beats_the_global_loss_threshold(fleet: Fleet):
    """With per-example difficulty, per-example calibration must win (the point of LiRA)."""
    score_attacks(fleet.db, ["loss"])
    rows = query(
        fleet.db,
        "SELECT attack, avg(auc) AS auc FROM v_metrics WHERE perturbation = 'benign' "
        "AND attack IN ('loss', 'lira_online') GROUP BY attack",
    )
    by = {r["attack"]: r for r in rows}
    # 80 non-members per model cannot resolve TPR at 1% FPR; AUC is what this fleet size can show
    assert by["lira_online"]["auc"] > by["loss"]["auc"] + 0.1


def test_scores_do_not_depend_on_the_targets_own_labels(fleet: Fleet, tmp_path: Path):
    """Permute one target's is_member in a copy of the store and re-score: its scores are bit-identical."""
    db = tmp_path / "permuted.duckdb"
    shutil.copy2(fleet.db, db)
    target = fleet.keys[2]
    perm = np.random.default_rng(0).permutation(fleet.members[2]).tolist()
    ids = list(range(500, 500 + len(perm)))
    with duckdb.connect(str(db)) as con:
        for table in ("membership", "signals"):
            con.execute(
                f"UPDATE {table} SET is_member = p.m FROM (SELECT unnest($i) AS id, unnest($m) AS m) p "
                f"WHERE {table}.model_key = $k AND {table}.example_id = p.id",
                {"i": ids, "m": perm, "k": target},
            )
        assert (
            con.execute(
                "SELECT count(*) FROM membership WHERE model_key = ? AND is_member", [target]
            ).fetchone()[0]
            == 80
        )
    score_attacks(db, [*SINGLE, *JOINT], force=True)
    for attack in (*SINGLE, *JOINT):
        for perturbation in {"lira_online_joint_verified": ("ver",)}.get(
            attack, ("pgd",) if attack in JOINT else PERTURBATIONS
        ):
            np.testing.assert_array_equal(
                stored(db, attack, target, perturbation),
                stored(fleet.db, attack, target, perturbation),
                err_msg=attack,
            )


def test_one_reference_rmia_and_lira(tmp_path: Path):
    """RMIA's claim: it works with a single reference model. Two models: each is the other's reference."""
    fleet = make_fleet(tmp_path, seed=11, n_models=2)
    outcomes = score_attacks(fleet.db, ["rmia_offline", "rmia_online", "lira_online"])
    assert [o.scored for o in outcomes] == [6, 6, 6]
    p_true = np.exp(np.array([ref.log_p_true(z, fleet.labels) for z in fleet.logits["benign"]]))
    phi = phi_fleet(fleet, "benign")
    for t, key in enumerate(fleet.keys):
        expected = ref.rmia(p_true, fleet.members, t, "offline", gamma=2.0, a=0.3)
        np.testing.assert_allclose(
            stored(fleet.db, "rmia_offline", key, "benign"), expected, rtol=0, atol=1e-15
        )
        np.testing.assert_allclose(
            stored(fleet.db, "lira_online", key, "benign"),
            ref.lira(phi, fleet.members, t, "online"),
            rtol=1e-9,
        )
    rows = query(
        fleet.db, "SELECT auc FROM v_metrics WHERE attack = 'rmia_offline' AND perturbation = 'benign'"
    )
    assert all(r["auc"] > 0.6 for r in rows)
    # nested leave-one-out would leave a rescored reference no reference: no calibration, and why
    notes = query(fleet.db, "SELECT DISTINCT calibration_note, n_reference_models FROM v_metrics")
    assert notes == [{"calibration_note": TOO_FEW_NOTE, "n_reference_models": None}]


def _random_fleet(rng: np.random.Generator, n_models: int = 7, n: int = 40) -> fleet_module.FleetMatrix:
    """Integer values (many ties), absent entries, and examples without OUT (0) or IN (1) entries."""
    values = rng.integers(0, 5, (n_models, n)).astype(np.float64)
    present = rng.random((n_models, n)) < 0.85
    members = (rng.random((n_models, n)) < 0.5) & present
    members[:, 0] = present[:, 0]
    members[:, 1] = False
    values[~present] = np.nan
    labels = np.where(present, 3, -1)
    order = fleet_module.side_order(values, members, present)
    keys = [f"m{i}" for i in range(n_models)]
    return fleet_module.FleetMatrix(keys, np.arange(n), values, members, present, labels, order)


def test_leave_one_out_cut_equals_sorting_and_fitting_the_references_directly():
    """A target's references cut out of the fleet's one per-example sort are in the order a sort of the
    references alone gives, and their Gaussian fits (median by index) equal numpy's masked median / std."""
    fleet = _random_fleet(np.random.default_rng(5))
    for t, target in enumerate(fleet.model_keys):
        keys = [k for k in fleet.model_keys if k != target]
        refs = fleet_module.references_of(fleet, keys, fleet.example_id)
        others = np.arange(len(fleet.model_keys)) != t
        np.testing.assert_array_equal(refs.values, fleet.values[others])
        np.testing.assert_array_equal(
            refs.order, fleet_module.side_order(refs.values, refs.is_member, refs.present)
        )
        for inside in (True, False):
            keep = refs.present & (refs.is_member if inside else ~refs.is_member)
            for location in ("median", "mean"):
                for variance in ("global", "per_example"):
                    got = calibrated.fit_side(refs, inside, location, variance)
                    expected = ref.fit(np.nan_to_num(refs.values), keep, location, variance)
                    np.testing.assert_allclose(got[0], expected[0], rtol=1e-12, atol=1e-12)
                    np.testing.assert_allclose(got[1], expected[1], rtol=1e-12, atol=1e-12)


def test_fully_present_fleets_take_the_multiplied_mask_path_with_the_same_fits():
    """Every value finite (every model has every example): the side sums multiply by the 0/1 mask instead of
    masking each ufunc. Same fits as numpy's masked statistics and as the masked path itself; one inf value
    sends a matrix back to the masked path (inf * 0 would be NaN)."""
    fleet = _random_fleet(np.random.default_rng(11), n_models=9, n=60)
    fleet.values = np.random.default_rng(12).normal(size=fleet.values.shape)
    fleet.present[:] = True
    fleet.order = fleet_module.side_order(fleet.values, fleet.is_member, fleet.present)
    keys = fleet.model_keys[1:]
    for poisoned in (False, True):
        values = fleet.values.copy()
        if poisoned:
            values[2, 7] = np.inf
        fast = fleet_module.references_of(
            fleet_module.FleetMatrix(
                fleet.model_keys,
                fleet.example_id,
                values,
                fleet.is_member,
                fleet.present,
                fleet.label,
                fleet.order,
            ),
            keys,
            fleet.example_id,
        )
        assert fast.all_finite is not poisoned
        masked = fleet_module.ReferenceMatrix(
            fast.example_id, fast.values, fast.is_member, fast.present, fast.order, members_checked=True
        )
        masked._all_finite = False  # the path any matrix with an absent entry takes
        with np.errstate(invalid="ignore"):  # the inf's own side is NaN on both paths (inf - inf)
            _compare_fits(fast, masked, poisoned)


def _compare_fits(fast, masked, poisoned: bool) -> None:
    for inside in (True, False):
        keep = fast.present & (fast.is_member if inside else ~fast.is_member)
        np.testing.assert_array_equal(
            calibrated.side_mean(fast, calibrated.side(fast, inside)),
            calibrated.side_mean(masked, calibrated.side(masked, inside)),
        )
        for location in ("median", "mean"):
            for variance in ("global", "per_example"):
                got = calibrated.fit_side(fast, inside, location, variance)
                again = calibrated.fit_side(masked, inside, location, variance)
                np.testing.assert_allclose(got, again, rtol=1e-13, atol=0)
                if not poisoned:
                    expected = ref.fit(fast.values, keep, location, variance)
                    np.testing.assert_allclose(got[0], expected[0], rtol=1e-12, atol=1e-12)
                    np.testing.assert_allclose(got[1], expected[1], rtol=1e-12, atol=1e-12)


def test_a_targets_references_never_depend_on_its_own_row():
    """Replace target T's values and membership in the fleet (which changes the fleet's sort): what T's
    references look like is bit-identical, since T's row is removed before the attack sees anything."""
    rng = np.random.default_rng(9)
    fleet = _random_fleet(rng)
    changed = _random_fleet(rng)
    t = 3
    rows = [i for i in range(len(fleet.model_keys)) if i != t]
    for name in ("values", "is_member", "present", "label"):
        getattr(changed, name)[rows] = getattr(fleet, name)[rows]
    changed.order = fleet_module.side_order(changed.values, changed.is_member, changed.present)
    assert not np.array_equal(changed.order, fleet.order)
    keys = [k for k in fleet.model_keys if k != f"m{t}"]
    a = fleet_module.references_of(fleet, keys, fleet.example_id)
    b = fleet_module.references_of(changed, keys, fleet.example_id)
    for name in ("values", "is_member", "present", "label", "order"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


# --- test vectors of reference-attacks.md ----------------------------------------------------------------


def _ragged(lists: list[list[list[float]]]) -> np.ndarray:
    """TF Privacy's per-example reference lists as a NaN-padded [m, n, k] array."""
    m = max(1, max(len(x) for x in lists))
    k = max(len(r) for x in lists for r in x)
    out = np.full((m, len(lists), k), np.nan)
    for i, x in enumerate(lists):
        for j, r in enumerate(x):
            out[j, i, :] = r
    return out


def _tf_option(target, lists, option_in: bool, location: str, variance: str) -> np.ndarray:
    """TF's `in` (member-low -mean_k log p_in) or `out` (mean_k log p_out) through our fit, per query."""
    values = _ragged(lists)
    target = np.asarray(target, dtype=np.float64)
    per_query = []
    for q in range(target.shape[1]):
        loc, scale = calibrated.gaussian_fit(values[:, :, q], location, variance)
        per_query.append(calibrated.log_normal_pdf(target[:, q], loc, scale))
    mean = np.mean(per_query, axis=0)
    return -mean if option_in else mean


def test_tf_privacy_lira_vectors():
    target = [[1], [0], [0], [0]]
    stat_in = [[[-1], [1]], [[0], [2]], [[0], [20]], []]
    per_example = [1.41893853, 1.41893853, 3.72152363, 2.72537178]
    fixed = [2.69682468, 2.69682468, 4.15270703, 2.87983121]
    for location in ("median", "mean"):
        np.testing.assert_allclose(
            _tf_option(target, stat_in, True, location, "per_example"), per_example, atol=1e-8
        )
        np.testing.assert_allclose(_tf_option(target, stat_in, True, location, "global"), fixed, atol=1e-8)
        stat_out = [[[-v for v in r] for r in x] for x in stat_in]
        np.testing.assert_allclose(
            _tf_option([[-1], [0], [0], [0]], stat_out, False, location, "per_example"),
            [-v for v in per_example],
            atol=1e-8,
        )
    two = _tf_option([[1, 0]], [[[-1, 0], [1, 20]]], True, "median", "per_example")
    np.testing.assert_allclose(two, [2.57023108], atol=1e-8)
    # the non-symmetric vector through the attack's own statistic: LLR = -(TF's member-low `both`)
    ins, outs = [[[1], [2], [3]], [[2], [4]]], [[[-1], [0], [1]], [[0], [1], [2]]]
    refs = calibrated.ReferenceMatrix(
        np.arange(2),
        np.concatenate([_ragged(ins)[:, :, 0], _ragged(outs)[:, :, 0]]),
        np.concatenate([np.ones((3, 2), bool), np.zeros((3, 2), bool)]),
        np.concatenate([~np.isnan(_ragged(ins)[:, :, 0]), np.ones((3, 2), bool)]),
    )
    phi = np.array([1.5, 0.0])
    np.testing.assert_allclose(
        calibrated.lira_online(phi, refs, "median", "per_example"), [1.5, -3.95273255], atol=1e-8
    )
    np.testing.assert_allclose(
        calibrated.lira_online(phi, refs, "median", "global"), [1.44008922, -4.96616078], atol=1e-8
    )
    np.testing.assert_allclose(
        _tf_option([[1.5], [0]], outs, False, "median", "per_example"), [-2.40370598, -1.46620598], atol=1e-8
    )
    # offline is one-sided: Phi(z) ranks phi far below mu_out as a non-member (the reference code's two-sided
    # log-density would rank it like phi far above)
    z = calibrated.lira_offline(np.array([-10.0, 10.0]), refs, "median", "per_example")
    assert norm.cdf(z[0]) < 0.01 and z[1] > 2


def test_rmia_worked_example():
    """reference-attacks.md §5, v2 `run_rmia`: target 0, k = 1; the quirk's top-1 OUT values given directly."""
    x_target, p_out_x = np.array([0.9, 0.3]), np.array([0.4, 0.35])
    z_target, p_out_z = np.array([0.5, 0.2, 0.8]), np.array([0.6, 0.25, 0.95])
    expected = {0.3: [1, 1 / 3], 0.0: [1, 1 / 3], 1.0: [1, 1]}
    for a, scores in expected.items():
        pr_x, pr_z = ((1 + a) / 2 * p + (1 - a) / 2 for p in (p_out_x, p_out_z))
        ratio_x, ratio_z = x_target / pr_x, z_target / pr_z
        if a == 0.3:
            np.testing.assert_allclose(ratio_x, [1.47541, 0.51948], atol=1e-5)
            np.testing.assert_allclose(ratio_z, [0.67568, 0.39024, 0.82687], atol=1e-5)
        got = calibrated.rmia_fraction(ratio_x, ratio_z, gamma=1.0, exclude_self=False)
        np.testing.assert_allclose(got, scores, atol=1e-15)


def test_song_mittal_vectors():
    assert calibrated.threshold_setting(np.array([0.9, 0.8, 0.6]), np.array([0.7, 0.5, 0.4])) == 0.8
    assert calibrated.threshold_setting(np.array([0.9]), np.array([])) == 0.0
    hist = calibrated.risk_histogram(np.array([0.01, 0.02, 0.05, 0.1]), np.array([0.1, 0.5, 1, 2]), 5, True)
    np.testing.assert_allclose(hist.edges, [0.01, 0.028854, 0.083255, 0.240225, 0.693145, 2], atol=1e-6)
    np.testing.assert_allclose(hist.member, [0.5, 0.25, 0.25, 0, 0])
    np.testing.assert_allclose(hist.nonmember, [0, 0, 0.25, 0.25, 0.5])
    values = np.array([0.015, 0.3, 5, 1e-4, 0.1])
    np.testing.assert_allclose(calibrated.risk_posterior(values, hist), [1, 0, 0, 1, 0.5])
    empty = calibrated.risk_histogram(np.array([0.01, 0.01, 2, 2]), np.array([0.01, 2, 2, 2]), 5, True)
    np.testing.assert_allclose(calibrated.risk_posterior(np.array([0.2, 1.0]), empty), [2 / 3, 0.4])
    mentropy = signals_from_probs(np.array([[0.7, 0.2, 0.1]], np.float32), np.array([0]))["mentropy"]
    assert mentropy[0] == pytest.approx(0.16216725, abs=1e-7)


def test_bad_params_are_one_line_errors(fleet: Fleet):
    result = CliRunner().invoke(
        main, ["score", "--attack", "lira_online", "--param", "variance=fixed", "--db", str(fleet.db)]
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("Error: ")
    assert "variance must be one of ['per_example', 'global']" in result.output


def test_report_pools_each_attacks_roc_over_a_defenses_models(fleet: Fleet):
    """The per-attack ROC (every defense on shared axes) is the pooled ROC of the fleet's targets: each
    plotted vertex is a vertex of scikit-learn's ROC of the concatenated scores."""
    from sklearn.metrics import roc_curve

    from robmia_db.report.figures import ChartList, attack_roc_charts
    from robmia_db.report.queries import collect_report_data

    data = collect_report_data(fleet.db)
    points = [
        p for p in data.attack_roc_points if p["attack"] == "lira_online" and p["perturbation"] == "benign"
    ]
    assert points and {p["n_models"] for p in points} == {len(fleet.keys)}
    rows = query(
        fleet.db,
        "SELECT score, is_member FROM v_scores WHERE attack = 'lira_online' AND perturbation = 'benign'",
    )
    fpr, tpr, _ = roc_curve(
        [r["is_member"] for r in rows], [r["score"] for r in rows], drop_intermediate=False
    )
    vertices = set(zip(np.round(fpr, 9), np.round(tpr, 9)))
    assert all((round(p["fpr"], 9), round(p["tpr"], 9)) in vertices for p in points)
    charts = attack_roc_charts(data, ChartList())
    names = {c["attack"] for c in charts}
    assert {*SINGLE, *JOINT} <= names
    lira = next(c for c in charts if c["attack"] == "lira_online")
    assert len(lira["curves"]) == len(PERTURBATIONS)  # one defense (imported) x three perturbations


ROWS_ATTACK = """
import numpy as np

ATTACK = {"title": "rows as arrays equal the SQL relations", "needs": ["signal", "reference_models"]}
COLUMNS = ["loss", "probs", "confidence", "mentropy"]


def same(got, table, name):
    want = table.column(name)
    if name == "probs":
        want = want.combine_chunks()
        want = want.flatten().to_numpy().reshape(len(want), -1).astype(np.float64)
    else:
        want = want.to_numpy(zero_copy_only=False)
    if got[name].dtype == object:
        want = want.astype(object)
    if got[name].shape != want.shape or not np.array_equal(got[name], want):
        raise ValueError(f"{name} differs from the SQL relation")


def score(ctx, params):
    targets = ctx.target_rows(COLUMNS)
    sql = ctx.sql("SELECT * FROM target ORDER BY example_id")
    (key,) = targets
    for name in ["example_id", "label", *COLUMNS]:
        same(targets[key], sql, name)
    refs = ctx.reference_rows(key, COLUMNS)
    sql = ctx.sql("SELECT * FROM reference ORDER BY model_key, example_id")
    if key in set(refs["model_key"]) or len(refs["model_key"]) != sql.num_rows:
        raise ValueError("reference rows hold the target or miss rows")
    for name in ["model_key", "example_id", "label", "is_member", *COLUMNS]:
        same(refs, sql, name)
    return {"model_key": [key] * len(targets[key]["example_id"]), "example_id": targets[key]["example_id"],
            "score": -targets[key]["loss"]}
"""


def test_reference_rows_are_the_reference_relation_without_the_target(fleet: Fleet, tmp_path: Path):
    """`ctx.target_rows` / `ctx.reference_rows` (what attack_model and shokri read, without SQL) hold
    exactly the rows, order and values of the sandbox's `target` / `reference` relations (the attack
    raises otherwise), and never a row of the target."""
    db = tmp_path / "rows.duckdb"
    shutil.copy2(fleet.db, db)
    attack = tmp_path / "rows_equal_sql.py"
    attack.write_text(ROWS_ATTACK)
    (outcome,) = score_attacks(db, [attack], calibration_models=2, resamples=0)
    assert outcome.scored == len(fleet.keys) * len(PERTURBATIONS) and not outcome.skipped
    for key in fleet.keys[:2]:
        loss = query(db, "SELECT loss FROM v_signals WHERE model_key = $k AND perturbation = 'benign' "
                     "ORDER BY example_id", k=key)  # fmt: skip
        np.testing.assert_array_equal(stored(db, "rows_equal_sql", key, "benign"), [-r["loss"] for r in loss])


def test_shokri_trains_one_attack_model_per_class_on_the_references_only(fleet: Fleet):
    """Restated with scikit-learn on the fleet's float32 probability vectors: per target and class, an MLP
    on the other models' members vs non-members of that class (balanced by the same seeded subsample)."""
    from attack_fixtures import paper_softmax
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    (outcome,) = score_attacks(fleet.db, ["shokri"], params={"max_iter": 50})
    assert outcome.scored == len(fleet.keys) * len(PERTURBATIONS)
    probs = np.array([paper_softmax(z) for z in fleet.logits["benign"]]).astype(np.float64)
    order = np.argsort(fleet.keys)
    for t in (0, 3):
        expected = np.zeros(len(fleet.labels))
        for label in np.unique(fleet.labels):
            cls = fleet.labels == label
            others = [i for i in order if i != t]
            x = np.concatenate([probs[i][cls] for i in others])
            y = np.concatenate([fleet.members[i][cls] for i in others])
            rng = np.random.default_rng(0)
            size = min(y.sum(), (~y).sum())
            keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(y), size, replace=False),
                                           rng.choice(np.flatnonzero(~y), size, replace=False)]))  # fmt: skip
            model = MLPClassifier(hidden_layer_sizes=(64,), max_iter=50, random_state=0)
            with threadpool_limits(1), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # 50 iterations need not converge: both sides stop alike
                model.fit(x[keep], y[keep])
            expected[cls] = model.predict_proba(probs[t][cls])[:, list(model.classes_).index(True)]
        # a non-default parameter makes its own variant, stored under its own name
        variant = "shokri[max_iter=50]"
        np.testing.assert_allclose(stored(fleet.db, variant, fleet.keys[t], "benign"), expected, rtol=1e-12)


def test_runner_records_confidence_logit_for_benign_and_pgd(tmp_path: Path):
    """Trained through the runner: phi agrees with the stored float64 loss, phi = log p - log(1 - p) with
    log p = -loss, on every row of every perturbation kind recorded."""
    import torch
    from attack_fixtures import population_spec

    from robmia_db.runner.executor import run_specs

    torch.set_num_threads(1)
    db = tmp_path / "runner.duckdb"
    summary = run_specs([population_spec(tmp_path / "p.toml", signals=("benign", "pgd"), epochs=3)], db)
    assert not summary.failed
    rows = query(db, "SELECT kind, loss, confidence_logit FROM v_signals")
    assert {r["kind"] for r in rows} == {"benign", "adversarial"} and len(rows) == 3 * 300 * 2
    loss = np.array([r["loss"] for r in rows])
    phi = np.array([r["confidence_logit"] for r in rows])
    np.testing.assert_allclose(phi, -loss - np.log(-np.expm1(-loss)), rtol=1e-9, atol=1e-9)
