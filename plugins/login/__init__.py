"""Browser login (OIDC, SAML) for `kubegate login` and the gateway tokens it mints: the `login` plugin is
`plugin.py`. This package imports nothing itself, so `kubegate credential` — which kubectl runs before
every request — loads only `client.py`, not the server side."""
