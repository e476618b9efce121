"""Arena ratings: rank assistants from pairwise battles, as Chatbot Arena does.

A battle is two anonymous answers to one prompt and a verdict: a wins, b wins, a tie, or both bad
(a tie for the ratings). From many battles:

- Bradley-Terry: P(a beats b) = 1 / (1 + 10^((R_b - R_a) / 400)), fitted by maximum likelihood over
  all battles at once (a tie counts half a win each way); ratings are centred on 1000. The order of
  battles does not matter, unlike Elo.
- bootstrap 95% intervals: the battles are resampled with replacement (seeded), refitted, and the
  2.5 / 97.5 percentiles kept; a model's rank is 1 + the number of models whose lower bound is
  above its upper bound (FastChat's rule: overlapping intervals share a rank).
- online Elo (K = 4, start 1000), the classic sequential update, for comparison.
- style control: the answers' length difference, (len_a - len_b) / (len_a + len_b + 1), scaled,
  joins the fit as a covariate with its own coefficient (L2 0.5), so a model is not rated up just
  for writing more.

    battles = [Battle("sft", "grpo", "b"), Battle("sft", "base", "a"), ...]
    leaderboard(battles)   # [{"model", "rating", "ci_low", "ci_high", "rank", "elo", "battles", ...}]
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..common import PocketError

VERDICTS = ("a", "b", "tie", "both_bad")
SCALE, BASE, INIT = 400.0, 10.0, 1000.0


@dataclass(frozen=True)
class Battle:
    model_a: str
    model_b: str
    winner: str  # one of VERDICTS
    length_a: int = 0  # answer lengths in characters, for style control
    length_b: int = 0

    def __post_init__(self):
        if self.winner not in VERDICTS:
            raise PocketError(f"a battle's verdict is one of {', '.join(VERDICTS)}, not {self.winner!r}")
        if self.model_a == self.model_b:
            raise PocketError(f"a battle needs two different models, got {self.model_a!r} twice")


def _design(battles: list[Battle], models: list[str], style: bool):
    """Rows of the logistic model: +1 for a's column, -1 for b's, the style feature, the outcome
    (1 a wins, 0 b wins, 0.5 tie)."""
    index = {m: i for i, m in enumerate(models)}
    X = np.zeros((len(battles), len(models)))
    y = np.empty(len(battles))
    for row, b in enumerate(battles):
        X[row, index[b.model_a]], X[row, index[b.model_b]] = 1.0, -1.0
        y[row] = {"a": 1.0, "b": 0.0}.get(b.winner, 0.5)
    if style:
        # Scaled, not centred: the feature flips sign with the sides, and centring would move a model's
        # average verbosity back into its rating whenever it sits on one side more often.
        f = np.array([(b.length_a - b.length_b) / (b.length_a + b.length_b + 1) for b in battles])
        scale = np.sqrt((f ** 2).mean())
        X = np.column_stack([X, f / scale if scale > 0 else f])
    return X, y


def _fit(X: np.ndarray, y: np.ndarray, weights: np.ndarray, n_models: int, style: bool,
         iterations: int = 100) -> np.ndarray:
    """Maximum likelihood of the logistic model by Newton's method: logit = ln(10) * X @ theta.

    The ratings are only defined up to a shift, so a tiny ridge (1e-6) pins their mean; the style
    coefficient gets FastChat's 0.5. The log-likelihood is concave: Newton converges in a few steps."""
    k = X.shape[1]
    ridge = np.full(k, 1e-6)
    if style:
        ridge[n_models:] = 0.5
    theta = np.zeros(k)
    ln10 = math.log(BASE)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-ln10 * (X @ theta)))
        grad = ln10 * X.T @ (weights * (y - p)) - ridge * theta
        hess = ln10 ** 2 * (X.T * (weights * p * (1 - p))) @ X + np.diag(ridge)
        step = np.linalg.solve(hess, grad)
        theta += step
        if np.abs(step).max() < 1e-10:
            break
    return theta


def bradley_terry(battles: list[Battle], style: bool = False, weights: np.ndarray | None = None) -> dict[str, float]:
    """Ratings (400 x log10-odds, mean 1000) by maximum likelihood over the battles."""
    models = sorted({m for b in battles for m in (b.model_a, b.model_b)})
    if not battles:
        return {}
    X, y = _design(battles, models, style)
    w = np.ones(len(battles)) if weights is None else weights
    theta = _fit(X, y, w, len(models), style)
    r = theta[:len(models)]
    return {m: float(SCALE * (v - r.mean()) + INIT) for m, v in zip(models, r)}


def bootstrap(battles: list[Battle], rounds: int = 100, seed: int = 0, style: bool = False) -> dict[str, np.ndarray]:
    """Each model's rating in `rounds` refits on battles resampled with replacement (multinomial
    counts over the battles, seeded: the same seed gives the same intervals)."""
    models = sorted({m for b in battles for m in (b.model_a, b.model_b)})
    X, y = _design(battles, models, style)
    rng = np.random.default_rng(seed)
    out = np.empty((rounds, len(models)))
    for i in range(rounds):
        counts = rng.multinomial(len(battles), np.full(len(battles), 1 / len(battles))).astype(float)
        r = _fit(X, y, counts, len(models), style)[:len(models)]
        out[i] = SCALE * (r - r.mean()) + INIT
    return {m: out[:, j] for j, m in enumerate(models)}


def online_elo(battles: list[Battle], k: float = 4.0) -> dict[str, float]:
    """The sequential Elo update, battle by battle in the given order."""
    rating: dict[str, float] = {}
    for b in battles:
        ra, rb = rating.setdefault(b.model_a, INIT), rating.setdefault(b.model_b, INIT)
        expected_a = 1 / (1 + BASE ** ((rb - ra) / SCALE))
        score_a = {"a": 1.0, "b": 0.0}.get(b.winner, 0.5)
        rating[b.model_a] = ra + k * (score_a - expected_a)
        rating[b.model_b] = rb - k * (score_a - expected_a)
    return rating


def unsettled(battles: list[Battle]) -> str | None:
    """None when the votes bound every rating; else a sentence saying why they do not. Maximum likelihood gives
    finite Bradley-Terry ratings only if every model can be reached from every other along "did not lose to"
    (a win or a tie): a model that never lost (one vote, say) has no finite rating, nor have two groups that
    never met, and the numbers shown are then set by the fit's tiny ridge (a single vote put 2,357 points and
    zero-width intervals between two models). FastChat's fit is as unbounded; saying so is ours."""
    models = sorted({m for b in battles for m in (b.model_a, b.model_b)})
    index = {m: i for i, m in enumerate(models)}
    reach = np.eye(len(models), dtype=bool)
    for b in battles:  # i -> j: i won or tied against j once
        a, o = index[b.model_a], index[b.model_b]
        if b.winner != "b":
            reach[a, o] = True
        if b.winner != "a":
            reach[o, a] = True
    for k in range(len(models)):  # the transitive closure (a handful of models)
        reach |= reach[:, k:k + 1] & reach[k:k + 1, :]
    if reach.all():
        return None
    # a group the others never beat nor tied: its models reach each other, and nobody outside reaches them
    top = next(i for i in range(len(models)) if all(reach[i, j] or not reach[j, i] for j in range(len(models))))
    group = [m for j, m in enumerate(models) if reach[top, j] and reach[j, top]]
    return (f"too few votes to settle the ratings: {', '.join(group)} never lost to the others nor tied with them, "
            "so the votes bound no rating between them; the numbers shown are not estimates")


def leaderboard(battles: list[Battle], rounds: int = 100, seed: int = 0) -> list[dict]:
    """One row per model, best first: Bradley-Terry rating with its bootstrap interval and rank, the
    style-controlled rating, online Elo, battles played and win rate."""
    if not battles:
        return []
    ratings, styled, elo = bradley_terry(battles), bradley_terry(battles, style=True), online_elo(battles)
    samples = bootstrap(battles, rounds, seed)
    lows = {m: float(np.percentile(s, 2.5)) for m, s in samples.items()}
    highs = {m: float(np.percentile(s, 97.5)) for m, s in samples.items()}
    played, won = Counter(), Counter()
    for b in battles:
        played[b.model_a] += 1
        played[b.model_b] += 1
        won[b.model_a] += {"a": 1.0, "b": 0.0}.get(b.winner, 0.5)
        won[b.model_b] += {"b": 1.0, "a": 0.0}.get(b.winner, 0.5)
    rows = [{"model": m, "rating": r, "ci_low": lows[m], "ci_high": highs[m],
             "rank": 1 + sum(lows[o] > highs[m] for o in ratings if o != m),
             "style_controlled": styled[m], "elo": elo[m], "battles": played[m], "win_rate": won[m] / played[m]}
            for m, r in ratings.items()]
    return sorted(rows, key=lambda row: -row["rating"])


# ---------------------------------------------------------------------------------------------
# Votes from people (the chat page's arena tab): one SQLite file.


class VoteStore:
    """Votes in SQLite: one file, write-ahead logging so readers never block the writer, each vote its
    own committed transaction (a crash loses at most the vote being written, never an earlier one),
    and a busy timeout so concurrent writers wait for each other instead of failing."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("""CREATE TABLE IF NOT EXISTS votes (
                id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, model_a TEXT NOT NULL,
                model_b TEXT NOT NULL, winner TEXT NOT NULL, prompt TEXT NOT NULL DEFAULT '',
                length_a INTEGER NOT NULL DEFAULT 0, length_b INTEGER NOT NULL DEFAULT 0)""")

    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA synchronous=FULL")
            return db
        except sqlite3.DatabaseError as e:
            raise PocketError(f"{self.path}: not a usable vote database ({e})") from None

    def add(self, battle: Battle, prompt: str = "") -> int:
        db = self._connect()
        try:
            cur = db.execute("INSERT INTO votes (time, model_a, model_b, winner, prompt, length_a, length_b) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)", (time.time(), battle.model_a, battle.model_b,
                                                              battle.winner, prompt, battle.length_a, battle.length_b))
            return int(cur.lastrowid)
        finally:
            db.close()

    def battles(self) -> list[Battle]:
        db = self._connect()
        try:
            rows = db.execute("SELECT model_a, model_b, winner, length_a, length_b FROM votes ORDER BY id").fetchall()
        except sqlite3.DatabaseError as e:
            raise PocketError(f"{self.path}: not a usable vote database ({e})") from None
        finally:
            db.close()
        return [Battle(*row) for row in rows]
