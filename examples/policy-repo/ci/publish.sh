#!/bin/sh
# CI for this policy repository: the GitHub workflow runs it, and any other CI can.
#
#   ci/publish.sh           test: the native unit tests, then every vector through the real
#                           gateway host (with each policy's fuel budget)
#   ci/publish.sh v1.2.0    test, then publish version 1.2.0 (so does a run for the tag
#                           refs/tags/v1.2.0 in GitHub Actions, through GITHUB_REF)
#
# Publishing reads (files, never the secrets themselves):
#   POLICY_REPO              the policy repository gateways follow: https://host/repo.git,
#                            ssh://[user@]host[:port]/repo.git, or a path
#   POLICY_SIGN_KEY_FILE     Ed25519 key from `omnirelay policy keygen` to sign the commit
#                            (gateways that follow a network remote require signed commits)
#   POLICY_CREDENTIAL_FILE   https: the credential (mode 0600), sent as
#   POLICY_CREDENTIAL_KIND   bearer (default: the file is a token) or basic (user:password)
#   POLICY_CA_FILE           https: CAs of the server, when not under the system's roots
#   POLICY_SSH_KEY_FILE      ssh: the private key (mode 0600)
#   POLICY_KNOWN_HOSTS_FILE  ssh: known_hosts holding the server's host key (required)
#   OMNIRELAY                the omnirelay binary (default: omnirelay on the PATH)
set -eu
cd "$(dirname "$0")/.."
omnirelay="${OMNIRELAY:-omnirelay}"

tag="${1:-}"
if [ -z "$tag" ]; then
    case "${GITHUB_REF:-}" in
        refs/tags/v*) tag="${GITHUB_REF#refs/tags/}" ;;
    esac
fi

echo "--- cargo test"
cargo test
echo "--- omnirelay policy test"
"$omnirelay" policy test .

case "$tag" in
    "")
        echo "no version tag: tested, not published"
        exit 0
        ;;
    v[0-9]*.[0-9]*.[0-9]*) ;;
    *)
        echo "$tag is not a version tag (vX.Y.Z)" >&2
        exit 2
        ;;
esac
: "${POLICY_REPO:?POLICY_REPO must name the policy repository to publish to}"

set -- policy publish --source . --repo "$POLICY_REPO" --version "${tag#v}"
# A flag for each setting whose file exists and is not empty.
if [ -n "${POLICY_SIGN_KEY_FILE:-}" ] && [ -s "$POLICY_SIGN_KEY_FILE" ]; then
    set -- "$@" --sign-key "$POLICY_SIGN_KEY_FILE"
fi
if [ -n "${POLICY_CREDENTIAL_FILE:-}" ] && [ -s "$POLICY_CREDENTIAL_FILE" ]; then
    set -- "$@" --credential-file "$POLICY_CREDENTIAL_FILE" \
        --credential-kind "${POLICY_CREDENTIAL_KIND:-bearer}"
fi
if [ -n "${POLICY_CA_FILE:-}" ] && [ -s "$POLICY_CA_FILE" ]; then
    set -- "$@" --ca-file "$POLICY_CA_FILE"
fi
if [ -n "${POLICY_SSH_KEY_FILE:-}" ] && [ -s "$POLICY_SSH_KEY_FILE" ]; then
    set -- "$@" --ssh-key "$POLICY_SSH_KEY_FILE"
fi
if [ -n "${POLICY_KNOWN_HOSTS_FILE:-}" ] && [ -s "$POLICY_KNOWN_HOSTS_FILE" ]; then
    set -- "$@" --known-hosts "$POLICY_KNOWN_HOSTS_FILE"
fi

echo "--- omnirelay policy publish ${tag#v}"
"$omnirelay" "$@"
