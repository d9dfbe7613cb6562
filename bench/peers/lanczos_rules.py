"""Stopping rules for the crate's one-vector Lanczos, against the pass where it truly converged.

An f64 model of the crate's cold-start spectral norm (Lanczos on U^T U from a random unit
vector, full re-orthogonalisation twice, one product with U^T U per pass) on Gaussian
matrices. After each pass it evaluates, from the tridiagonal T_k and the last residual norm
only (what the crate sees), three rules for a relative tolerance `tol` on sigma, that is
`2 tol theta` on theta = sigma^2:

- crate: the crate's rule (math §4.9.1). Kato-Temple, `min(r1, r1^2 / (theta1 - a))`, with
  the ceiling `a = theta2 + r2` on lambda2 (from the second pass on);
- refined: the same with a tighter ceiling, theta2 plus its own Kato-Temple bound
  `min(r2, r2^2 / g2)`, `g2 = min(theta1 - theta2, theta2 - theta3 - r3)`;
- probabilistic: the a-posteriori bound of van Dorsselaer, Hochstenbach and van der Vorst
  (2000): lambda1 lies below the largest t with `prod_j (t - theta_j) = beta_1 ... beta_k / delta`,
  unless the start vector's weight on the top eigenvector is below delta, which for a
  uniformly random start happens with probability at most `delta sqrt(2n / pi)` (here 1e-4).
  A proof given the random start, with no assumption on the spectrum.

It prints, per matrix, the first pass whose sigma is truly within the tolerance (from the
exact norm) and the pass at which each rule stops, with the true error there.

    target/peers-venv/bin/python bench/peers/lanczos_rules.py [N] [MATRICES] [SEED]
    # defaults 1024 12 0: a few seconds on 2 cores
"""

import math
import sys

import numpy as np

TOLERANCE = 1e-3
FAILURE_PROBABILITY = 1e-4


def kato_temple(r, gap):
    return min(r, r * r / gap) if gap > 0 else r


def probabilistic_ceiling(theta, log_betas, delta):
    """The largest t > theta_1 with sum_j log(t - theta_j) = log_betas - log(delta)."""
    target = log_betas - math.log(delta)
    top = theta.max()
    excess = lambda t: np.sum(np.log(t - theta)) - target
    low, step = top, max(abs(top), 1e-300) * 1e-12
    high = top + step
    while excess(high) < 0:
        step *= 2
        high = top + step
    for _ in range(200):
        middle = 0.5 * (low + high)
        if excess(middle) < 0:
            low = middle
        else:
            high = middle
    return high


def rules(alphas, betas, residual_norm, delta):
    """Which rules stop after this pass: T_k from `alphas`, `betas` (k - 1 of them)."""
    k = len(alphas)
    tridiagonal = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    theta, vectors = np.linalg.eigh(tridiagonal)
    theta, vectors = theta[::-1], vectors[:, ::-1]
    r = residual_norm * np.abs(vectors[-1, :])
    limit = 2 * TOLERANCE * theta[0]
    stops = {}
    crate = kato_temple(r[0], theta[0] - (theta[1] + r[1])) if k > 1 else r[0]
    stops["crate"] = crate <= limit
    if k > 2:
        gap2 = min(theta[0] - theta[1], theta[1] - (theta[2] + r[2]))
        ceiling = theta[1] + kato_temple(r[1], gap2)
        refined = kato_temple(r[0], theta[0] - ceiling)
    else:
        refined = crate
    stops["refined"] = refined <= limit
    log_betas = float(np.sum(np.log(betas))) + math.log(residual_norm)
    stops["probabilistic"] = probabilistic_ceiling(theta, log_betas, delta) - theta[0] <= limit
    return theta[0], stops


def run(matrix, rng, delta, max_passes=400):
    n = matrix.shape[1]
    sigma = np.linalg.norm(matrix, 2)
    start = rng.standard_normal(n)
    basis = [start / np.linalg.norm(start)]
    alphas, betas, errors, stopped = [], [], [], {}
    for passes in range(1, max_passes + 1):
        product = matrix.T @ (matrix @ basis[-1])
        alphas.append(basis[-1] @ product)
        space = np.array(basis)
        for _ in range(2):
            product -= space.T @ (space @ product)
        residual_norm = np.linalg.norm(product)
        theta, stops = rules(np.array(alphas), np.array(betas), residual_norm, delta)
        errors.append(abs(math.sqrt(max(theta, 0.0)) - sigma) / sigma)
        for rule, stop in stops.items():
            if stop and rule not in stopped:
                stopped[rule] = passes
        if len(stopped) == 3:
            break
        betas.append(residual_norm)
        basis.append(product / residual_norm)
    truly = next((i + 1 for i, e in enumerate(errors) if e <= TOLERANCE), None)
    return truly, stopped, errors


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    matrices = int(sys.argv[2]) if len(sys.argv) > 2 else 12
    rng = np.random.default_rng(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    delta = FAILURE_PROBABILITY * math.sqrt(math.pi / (2 * n))
    for index in range(matrices):
        matrix = rng.standard_normal((n, n))
        truly, stopped, errors = run(matrix, rng, delta)
        described = ", ".join(
            f"{rule} {passes} (error {errors[passes - 1]:.1e})" for rule, passes in stopped.items()
        )
        print(f"gaussian {n}x{n} #{index}: within {TOLERANCE:g} from pass {truly}; stops: {described}",
              flush=True)


if __name__ == "__main__":
    main()
