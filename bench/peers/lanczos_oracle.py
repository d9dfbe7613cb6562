"""How few passes could any stopping rule give Lanczos on Gaussian matrices?

An f64 model of the crate's cold-start spectral norm (Lanczos on U^T U, full
re-orthogonalisation, one product with U^T U per pass), stopped by an oracle: the exact
singular values. For each size it prints the first pass whose estimate sqrt(theta) is within
1e-3 relative of ||U||_2, for one vector (the crate's method) and for block Lanczos with 2, 4
and 8 vectors (one pass then multiplies that many vectors). No stopping rule that only sees
the Krylov space can stop earlier than this oracle.

    target/peers-venv/bin/python bench/peers/lanczos_oracle.py   # a few minutes on 2 cores
"""

import numpy as np

TOLERANCE = 1e-3


def first_pass_within(matrix, block, max_passes, seed):
    sigma = np.linalg.norm(matrix, 2)
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((matrix.shape[1], block)))
    blocks = [basis]
    for passes in range(1, max_passes + 1):
        product = matrix.T @ (matrix @ blocks[-1])
        space = np.hstack(blocks)
        for _ in range(2):
            product -= space @ (space.T @ product)
        blocks.append(np.linalg.qr(product)[0])
        # Rayleigh-Ritz on the space the first `passes` products span (what T_k holds).
        gram = (matrix @ space).T @ (matrix @ space)
        theta = np.linalg.eigvalsh(gram)[-1]
        if abs(np.sqrt(theta) - sigma) / sigma < TOLERANCE:
            return passes
    return None


def main():
    rng = np.random.default_rng(1)
    for size in (2048, 4096):
        matrix = rng.standard_normal((size, size))
        for block in (1, 2, 4, 8):
            passes = first_pass_within(matrix, block, 40 if block == 1 else 24, seed=7)
            print(f"gaussian {size}x{size}, block {block}: first within {TOLERANCE:g} "
                  f"at pass {passes}")


if __name__ == "__main__":
    main()
