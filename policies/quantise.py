"""Probability quantisation of uploads (docs/design.md section 1, step 5; b_prob = 8 by default).

A policy only chooses the bit width (Decision.prob_bits); the payload codec
(agents.codec) quantises: for 8 and 16 bits, code = rint(p * L), L = 2^bits - 1 (halves to
even), p_hat = code / L, so |p_hat - p| <= 1 / (2L); 32 bits sends float32 as is. Each entry
is rounded on its own, so k sent entries may sum up to k / (2L) above 1; the server's
reconstruction (agents.speculative.reconstruct) tolerates that.
"""
PROB_BITS = (8, 16, 32)  # 32 = float32, no quantisation
