"""The actors and what they speak: device groups, the verifier, the batched LM runner,
the wire protocol and payload codec, and the speculative verification maths."""
