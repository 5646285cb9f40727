"""The API edge: the HTTPS API, the bounds a client meets before a handler runs, TLS, the CA,
enrolment and its nonces, and what a serving instance measures of itself."""
