package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"
	"github.com/pgnats/outbox/internal/testenv"
	"github.com/stretchr/testify/require"
)

// natsServer starts an in-process NATS server configured by opts and
// returns its client URL. It is shut down when the test ends.
func natsServer(t *testing.T, opts *server.Options) string {
	t.Helper()
	return testenv.StartNATSServer(t, opts).URL()
}

// writeFile writes body to name in dir and returns the path.
func writeFile(t *testing.T, dir, name string, body []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	require.NoError(t, os.WriteFile(p, body, 0o600))
	return p
}

// pki is a test certificate authority with a server certificate for
// 127.0.0.1 and a client certificate, as PEM files.
type pki struct {
	ca, serverCert, serverKey, clientCert, clientKey string
}

func newPKI(t *testing.T, name string) pki {
	t.Helper()
	dir := t.TempDir()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name + " CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	require.NoError(t, err)
	caCert, err := x509.ParseCertificate(caDER)
	require.NoError(t, err)
	leaf := func(serial int64, usage x509.ExtKeyUsage) (certPEM, keyPEM []byte) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		require.NoError(t, err)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name + " leaf"},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
			IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, DNSNames: []string{"localhost"},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
		require.NoError(t, err)
		keyDER, err := x509.MarshalECPrivateKey(key)
		require.NoError(t, err)
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
			pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	}
	sc, sk := leaf(2, x509.ExtKeyUsageServerAuth)
	cc, ck := leaf(3, x509.ExtKeyUsageClientAuth)
	return pki{
		ca:         writeFile(t, dir, "ca.pem", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})),
		serverCert: writeFile(t, dir, "server.pem", sc), serverKey: writeFile(t, dir, "server-key.pem", sk),
		clientCert: writeFile(t, dir, "client.pem", cc), clientKey: writeFile(t, dir, "client-key.pem", ck),
	}
}

// tlsServer returns server options requiring TLS with p's server
// certificate and, with verify, a client certificate signed by p's CA.
func tlsServer(t *testing.T, p pki, verify bool) *server.Options {
	t.Helper()
	cfg, err := server.GenTLSConfig(&server.TLSConfigOpts{CertFile: p.serverCert, KeyFile: p.serverKey, CaFile: p.ca, Verify: verify})
	require.NoError(t, err)
	if verify {
		// Under TLS 1.3 a server rejects a missing or untrusted client
		// certificate after the client's side of the handshake is done, and
		// the client may see only the closed connection (a transient-looking
		// error, retried in the background) instead of the alert. TLS 1.2
		// rejects it inside the handshake, which these tests assert on.
		cfg.MaxVersion = tls.VersionTLS12
	}
	return &server.Options{TLS: true, TLSVerify: verify, TLSConfig: cfg, TLSTimeout: 5}
}

// credsServer returns server options trusting a fresh operator, and a
// credentials file for a user of an account that operator signed.
func credsServer(t *testing.T) (*server.Options, string) {
	t.Helper()
	op, err := nkeys.CreateOperator()
	require.NoError(t, err)
	opPub, err := op.PublicKey()
	require.NoError(t, err)
	acc, err := nkeys.CreateAccount()
	require.NoError(t, err)
	accPub, err := acc.PublicKey()
	require.NoError(t, err)
	accJWT, err := jwt.NewAccountClaims(accPub).Encode(op)
	require.NoError(t, err)
	user, err := nkeys.CreateUser()
	require.NoError(t, err)
	userPub, err := user.PublicKey()
	require.NoError(t, err)
	userSeed, err := user.Seed()
	require.NoError(t, err)
	userJWT, err := jwt.NewUserClaims(userPub).Encode(acc)
	require.NoError(t, err)
	creds, err := jwt.FormatUserConfig(userJWT, userSeed)
	require.NoError(t, err)
	resolver := &server.MemAccResolver{}
	require.NoError(t, resolver.Store(accPub, accJWT))
	return &server.Options{TrustedKeys: []string{opPub}, AccountResolver: resolver},
		writeFile(t, t.TempDir(), "user.creds", creds)
}

// nkeyServer returns server options accepting one nkey user, and the
// user's seed file.
func nkeyServer(t *testing.T) (*server.Options, string) {
	t.Helper()
	kp, err := nkeys.CreateUser()
	require.NoError(t, err)
	pub, err := kp.PublicKey()
	require.NoError(t, err)
	seed, err := kp.Seed()
	require.NoError(t, err)
	return &server.Options{Nkeys: []*server.NkeyUser{{Nkey: pub}}}, writeFile(t, t.TempDir(), "user.nk", seed)
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

func TestConnectNATSAuthenticates(t *testing.T) {
	t.Parallel()
	nkeyOpts, seedFile := nkeyServer(t)
	_, otherSeed := nkeyServer(t)
	credsOpts, credsFile := credsServer(t)
	_, otherCreds := credsServer(t)
	tests := []struct {
		name   string
		server *server.Options
		good   natsOptions
		wrong  natsOptions
		secret string // must not appear in the wrong credentials' error
	}{
		{name: "user and password",
			server: &server.Options{Username: "outbox", Password: "pw-Secret-1"},
			good:   natsOptions{user: "outbox", password: "pw-Secret-1"},
			wrong:  natsOptions{user: "outbox", password: "pw-Wrong-1"}, secret: "pw-Wrong-1"},
		{name: "token",
			server: &server.Options{Authorization: "tok-Secret-2"},
			good:   natsOptions{token: "tok-Secret-2"},
			wrong:  natsOptions{token: "tok-Wrong-2"}, secret: "tok-Wrong-2"},
		{name: "nkey seed file",
			server: nkeyOpts,
			good:   natsOptions{nkeyFile: seedFile},
			wrong:  natsOptions{nkeyFile: otherSeed}},
		{name: "credentials file",
			server: credsOpts,
			good:   natsOptions{credsFile: credsFile},
			wrong:  natsOptions{credsFile: otherCreds}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			url := natsServer(t, tt.server)

			good := tt.good
			good.url = url
			nc, err := connectNATS(good, true, quiet, nil)
			require.NoError(t, err)
			require.True(t, nc.IsConnected())
			nc.Close()

			for name, o := range map[string]natsOptions{"wrong": tt.wrong, "none": {}} {
				o.url = url
				// wait=true: refused credentials fail at once, not in an
				// endless background retry.
				_, err := connectNATS(o, true, quiet, nil)
				require.Error(t, err, name)
				require.Contains(t, err.Error(), "refused the credentials", name)
				if tt.secret != "" {
					require.NotContains(t, err.Error(), tt.secret, name)
				}
			}
		})
	}
}

func TestConnectNATSWithTLS(t *testing.T) {
	t.Parallel()
	p := newPKI(t, "good")
	other := newPKI(t, "other")
	plainURL := natsServer(t, &server.Options{})
	tlsURL := natsServer(t, tlsServer(t, p, false))
	mtlsURL := natsServer(t, tlsServer(t, p, true))
	noPEM := writeFile(t, t.TempDir(), "empty.pem", []byte("not a certificate\n"))

	t.Run("server certificate checked against the CA", func(t *testing.T) {
		t.Parallel()
		nc, err := connectNATS(natsOptions{url: tlsURL, tlsCA: p.ca}, true, quiet, nil)
		require.NoError(t, err)
		require.True(t, nc.TLSRequired() || nc.IsConnected())
		state, err := nc.TLSConnectionState()
		require.NoError(t, err)
		require.True(t, state.HandshakeComplete)
		nc.Close()
	})
	t.Run("mutual TLS with a client certificate", func(t *testing.T) {
		t.Parallel()
		nc, err := connectNATS(natsOptions{url: mtlsURL, tlsCA: p.ca, tlsCert: p.clientCert, tlsKey: p.clientKey}, true, quiet, nil)
		require.NoError(t, err)
		require.True(t, nc.IsConnected())
		nc.Close()
	})

	fails := []struct {
		name string
		o    natsOptions
		want string
	}{
		{"CA file missing", natsOptions{url: tlsURL, tlsCA: filepath.Join(t.TempDir(), "missing.pem")}, "--nats-tls-ca"},
		{"CA file without a certificate", natsOptions{url: tlsURL, tlsCA: noPEM}, "no PEM certificate"},
		{"client key file missing", natsOptions{url: mtlsURL, tlsCA: p.ca, tlsCert: p.clientCert, tlsKey: noPEM + ".missing"}, "--nats-tls-key"},
		{"server without TLS while a CA is given", natsOptions{url: plainURL, tlsCA: p.ca}, "does not offer TLS"},
		{"server certificate from another CA", natsOptions{url: tlsURL, tlsCA: other.ca}, "TLS with NATS"},
		{"server requiring TLS, no CA given", natsOptions{url: tlsURL}, "TLS with NATS"},
		{"server requiring a client certificate, none given", natsOptions{url: mtlsURL, tlsCA: p.ca}, "TLS with NATS"},
		{"client certificate from another CA", natsOptions{url: mtlsURL, tlsCA: p.ca, tlsCert: other.clientCert, tlsKey: other.clientKey}, "TLS with NATS"},
		{"nkey seed file missing", natsOptions{url: plainURL, nkeyFile: noPEM + ".missing"}, "--nats-nkey"},
		{"credentials file missing", natsOptions{url: plainURL, credsFile: noPEM + ".missing"}, "--nats-creds"},
	}
	for _, tt := range fails {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			// wait=true: a setting that cannot be honoured is an error at
			// once, never a background retry or a fallback to plain text.
			nc, err := connectNATS(tt.o, true, quiet, nil)
			if nc != nil {
				nc.Close()
			}
			require.Error(t, err)
			require.Contains(t, err.Error(), tt.want)
			require.False(t, errors.As(err, new(usageError)), "a runtime error (exit 1), not a usage error: %v", err)
		})
	}
}

func TestNATSFlagsThatContradictAreUsageErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"token and user", []string{"--nats-token", "t", "--nats-user", "u", "--nats-password", "p"}, "alternatives"},
		{"token and creds", []string{"--nats-token", "t", "--nats-creds", "f"}, "alternatives"},
		{"nkey and creds", []string{"--nats-nkey", "f", "--nats-creds", "g"}, "alternatives"},
		{"user without password", []string{"--nats-user", "u"}, "go together"},
		{"password without user", []string{"--nats-password", "p"}, "go together"},
		{"cert without key", []string{"--nats-tls-cert", "c.pem"}, "--nats-tls-cert and --nats-tls-key"},
		{"key without cert", []string{"--nats-tls-key", "k.pem"}, "--nats-tls-cert and --nats-tls-key"},
		{"credentials in the URL and a token", []string{"--nats-url", "nats://u:pw-InURL@127.0.0.1:1", "--nats-token", "t"}, "holds credentials"},
	}
	for _, cmd := range []string{"run", "bench"} {
		for _, tt := range tests {
			t.Run(cmd+"/"+tt.name, func(t *testing.T) {
				t.Parallel()
				args := append([]string{cmd, "--database-url", "postgres://127.0.0.1:1/none"}, tt.args...)
				err := run(context.Background(), args, io.Discard, io.Discard)
				require.Error(t, err)
				require.True(t, errors.As(err, new(usageError)), "usage error (exit 2): %v", err)
				require.Contains(t, err.Error(), tt.want)
				require.NotContains(t, err.Error(), "pw-InURL")
			})
		}
	}
}
