"""A small numpy MLP on generated data: the model both examples train (no GPU, no downloads)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def make_data(samples: int, features: int = 8, seed: int = 0) -> tuple[np.ndarray, ...]:
    """A smooth non-linear regression problem, split 80/20 into train and validation."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, features))
    w = rng.normal(size=features)
    y = np.sin(x @ w / np.sqrt(features)) + 0.1 * (x[:, 0] ** 2) + 0.05 * rng.normal(size=samples)
    cut = int(0.8 * samples)
    return x[:cut], y[:cut, None], x[cut:], y[cut:, None]


@dataclass
class MLP:
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    @classmethod
    def init(cls, features: int, hidden: int, seed: int = 0) -> "MLP":
        rng = np.random.default_rng(seed)
        return cls(rng.normal(0, 1 / np.sqrt(features), (features, hidden)), np.zeros(hidden),
                   rng.normal(0, 1 / np.sqrt(hidden), (hidden, 1)), np.zeros(1))

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h = np.tanh(x @ self.w1 + self.b1)
        return h, h @ self.w2 + self.b2

    def loss(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean((self.forward(x)[1] - y) ** 2))

    def step(self, x: np.ndarray, y: np.ndarray, lr: float) -> None:
        h, out = self.forward(x)
        grad_out = 2 * (out - y) / len(x)
        grad_h = (grad_out @ self.w2.T) * (1 - h**2)
        self.w2 -= lr * h.T @ grad_out
        self.b2 -= lr * grad_out.sum(0)
        self.w1 -= lr * x.T @ grad_h
        self.b1 -= lr * grad_h.sum(0)


def train_epochs(model: MLP, data: tuple[np.ndarray, ...], epochs: int, lr: float, batch: int, seed: int = 0):
    """Yield (epoch, train loss, validation loss) after each epoch."""
    x, y, xv, yv = data
    rng = np.random.default_rng(seed)
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            model.step(x[idx], y[idx], lr)
        yield epoch, model.loss(x, y), model.loss(xv, yv)
