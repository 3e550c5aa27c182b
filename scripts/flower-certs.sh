#!/usr/bin/env bash
# TLS certificates for a Flower deployment: a private CA and a SuperLink certificate signed by it.
# Usage: scripts/flower-certs.sh OUT_DIR [HOST ...]
#   HOSTs are the names/IPs SuperNodes use to reach the SuperLink (default: 127.0.0.1 localhost).
# Writes ca.crt, ca.key, server.pem, server.key in OUT_DIR. Give ca.crt to every SuperNode
# (--root-certificates) and to the flwr CLI (root-certificates in ~/.flwr/config.toml); keep ca.key
# and server.key private. RSA key size: SEMFL_CERT_RSA_BITS (default 4096; the tests use 2048).
set -euo pipefail
bits="${SEMFL_CERT_RSA_BITS:-4096}"
out="${1:?usage: $0 OUT_DIR [HOST ...]}"; shift || true
hosts=("$@"); [ ${#hosts[@]} -gt 0 ] || hosts=(127.0.0.1 localhost)
mkdir -p "$out"; cd "$out"
san=""; i=1; j=1
for h in "${hosts[@]}"; do
  if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then san+="IP.$i = $h"$'\n'; i=$((i+1)); else san+="DNS.$j = $h"$'\n'; j=$((j+1)); fi
done
cat > server.cnf <<CNF
[req]
distinguished_name = dn
req_extensions = ext
prompt = no
[dn]
CN = ${hosts[0]}
[ext]
subjectAltName = @alt
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
[alt]
$san
CNF
openssl genrsa -out ca.key "$bits" 2>/dev/null
openssl req -new -x509 -key ca.key -sha256 -subj "/CN=semfl-flower-ca" -days 365 -out ca.crt
openssl genrsa -out server.key "$bits" 2>/dev/null
openssl req -new -key server.key -out server.csr -config server.cnf
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.pem -days 365 -sha256 \
  -extfile server.cnf -extensions ext 2>/dev/null
chmod 600 ca.key server.key
rm -f server.csr ca.srl
echo "certificates in $out: ca.crt server.pem server.key (SAN: ${hosts[*]})"
