"""A synthetic target language model given as explicit next-token distributions per prefix."""

import numpy as np
import torch


class SyntheticTarget:
    def __init__(self, vocab: int, seed: int, concentration: float = 0.7):
        self.vocab = vocab
        self.seed = seed
        self.concentration = concentration
        self._cache: dict[tuple, np.ndarray] = {}

    def logits(self, prefix: tuple) -> np.ndarray:
        """float64 logits of p(. | prefix); prefix = tokens after the root."""
        if prefix not in self._cache:
            code = 0
            for t in prefix:
                code = code * (self.vocab + 1) + t + 1
            rng = np.random.default_rng([self.seed, len(prefix), code])
            p = rng.dirichlet([self.concentration] * self.vocab)
            self._cache[prefix] = np.log(np.maximum(p, 1e-12))
        return self._cache[prefix]

    def probs(self, prefix: tuple, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
        """The sampling distribution under temperature / top-k (ties of the k-th kept) / top-p."""
        x = self.logits(prefix) / temperature
        order = np.argsort(-x, kind="stable")
        keep = np.ones(self.vocab, dtype=bool)
        if 0 < top_k < self.vocab:
            kth = x[order[top_k - 1]]
            keep &= x >= kth
        if top_p < 1.0:
            xs = np.where(keep, x, -np.inf)
            ps = np.exp(xs - xs.max())
            ps /= ps.sum()
            sorted_p = ps[order]
            before = np.cumsum(sorted_p) - sorted_p
            drop_sorted = before >= top_p
            drop_sorted[0] = False
            keep[order[drop_sorted]] = False
        x = np.where(keep, x, -np.inf)
        p = np.exp(x - x.max())
        return p / p.sum()

    def node_paths(self, tree, b: int = 0) -> list[tuple]:
        tok = tree.token_ids[b].tolist()
        par = tree.parents[b].tolist()
        paths = [()]
        for i in range(1, tree.num_slots):
            paths.append(paths[par[i]] + (tok[i],) if tree.valid[b, i] else ())
        return paths

    def tree_logits(self, tree) -> torch.Tensor:
        """[B, N, V] float32 target logits at every node slot (padding gets the root's row)."""
        out = np.stack([np.stack([self.logits(p) for p in self.node_paths(tree, b)])
                        for b in range(tree.batch_size)])
        return torch.from_numpy(out).float()

    def emitted_distribution(self, tree, b: int = 0, **sampling) -> dict[tuple, float]:
        """Exact law of the committed sequence of a lossless walk over tree b = AR sampling from the
        target, stopped at the first token that leaves the tree (that token is the bonus)."""
        paths = self.node_paths(tree, b)
        n = int(tree.num_nodes[b])
        children: dict[tuple, set] = {}
        for p in paths[1:n]:
            children.setdefault(p[:-1], set()).add(p[-1])
        out: dict[tuple, float] = {}

        def visit(prefix, mass):
            p = self.probs(prefix, **sampling)
            for x in range(self.vocab):
                if p[x] == 0:
                    continue
                if x in children.get(prefix, ()):
                    visit(prefix + (x,), mass * p[x])
                else:
                    out[prefix + (x,)] = out.get(prefix + (x,), 0.0) + mass * p[x]

        visit((), 1.0)
        return out
