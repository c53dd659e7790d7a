"""The OpenID Shared Signals Framework 1.0 receiver: the IdP tells the gateway that a user's sessions
were revoked, their account disabled or their credentials changed, and the gateway acts at once.

    transmitter --SET (RFC 8417)--> push endpoint (RFC 8935) or poller (RFC 8936)
        -> verify (verify.py: signature by the transmitter's JWKS, typ, iss, aud, iat, jti once)
        -> subject and event (events.py: RFC 9493 subject identifiers, CAEP and RISC event types)
        -> cut-off (revocations.py: shared with every replica through the replay store)
        -> tokens issued before it refused, their streams ended (receiver.py)
"""
