/* Sends one request to tallyd and prints the response payload on stdout.
 *
 *     request [--authenticate-only] CREDENTIAL-FILE PAYLOAD
 *
 * Connects to the server named in the credential, runs the handshake, sends PAYLOAD as
 * a REQUEST, prints the RESPONSE's payload, closes the session with CLOSE NORMAL.
 * The session is encrypted (spec 7.7) unless --authenticate-only is given, as with
 * `tally request` (payloads in the clear, each frame tagged: only with a server whose
 * policy allows it). A server that refuses the mode ends it with MODE_REFUSED, and this
 * program does not try the other mode (spec 7.8): the choice is the device's
 * configuration, not the network's.
 * Exit status 0 for a response with status OK; 1 otherwise, with the reason on stderr.
 * Server requests that arrive meanwhile are answered with status 4 (REFUSED). */
#include "common.h"
#include "tally.h"

int main(int argc, char **argv) {
    TallyMode mode = TALLY_MODE_ENCRYPTED;
    if (argc == 4 && strcmp(argv[1], "--authenticate-only") == 0) {
        mode = TALLY_MODE_AUTHENTICATED;
        argv++;
        argc--;
    }
    if (argc != 3) {
        fprintf(stderr, "usage: %s [--authenticate-only] CREDENTIAL-FILE PAYLOAD\n", argv[0]);
        return 2;
    }
    /* The library linked in must be the one tally.h describes. */
    if (tally_abi_version() != TALLY_ABI_VERSION) {
        fprintf(stderr, "libtally_c has ABI version %u, tally.h %u: rebuild against the library's header\n",
                (unsigned)tally_abi_version(), (unsigned)TALLY_ABI_VERSION);
        return 1;
    }
    struct credential cred;
    if (read_credential(argv[1], &cred) != 0) return 1;
    /* 32 random bytes, new for this connection: the ephemeral X25519 secret (the client
     * nonce in the authenticated mode). */
    uint8_t nonce[32];
    int fd = dial(cred.server);
    if (fd < 0 || random_bytes(nonce) != 0) {
        fprintf(stderr, fd < 0 ? "cannot connect to %s\n" : "no random bytes (%s)\n", cred.server);
        wipe(cred.key, sizeof cred.key);
        return 1;
    }
    /* 64 KiB: the largest frame this device accepts; the server sends nothing longer. */
    TallyClient *c = tally_client_new(cred.id, &cred.key, &cred.server_key, &nonce, mode, 65536, now_ms());
    wipe(cred.key, sizeof cred.key);
    wipe(nonce, sizeof nonce);
    if (!c) { fprintf(stderr, "invalid credential\n"); return 1; }

    const char *payload = argv[2];
    uint64_t seq = 0;
    int status = -1, exit_code = 1;
    uint8_t buf[4096];
    for (;;) {
        /* 1. What the engine has to say. */
        TallyEvent ev;
        while (tally_client_poll_event(c, &ev)) {
            uint64_t now = now_ms();
            switch (ev.kind) {
            case TALLY_EVENT_ESTABLISHED:
                if (tally_client_request(c, (const uint8_t *)payload, strlen(payload), now, &seq) != TALLY_OK)
                    tally_client_close(c, 0, now);
                break;
            case TALLY_EVENT_RESPONSE:
                if (ev.seq == seq) {
                    status = ev.status;
                    fwrite(ev.payload, 1, ev.payload_len, status == 0 ? stdout : stderr);
                    if (status != 0) fprintf(stderr, "\nrequest failed with status %d\n", status);
                    tally_client_close(c, 0, now);
                }
                break;
            case TALLY_EVENT_REQUEST:
                tally_client_respond(c, ev.seq, 4, (const uint8_t *)"no handler", 10, now);
                break;
            case TALLY_EVENT_CLOSED:
                if (ev.result != TALLY_OK && status < 0) {
                    fprintf(stderr, "session with %s as %s: %s", cred.server, cred.id,
                            tally_result_string(ev.result));
                    if (ev.code) fprintf(stderr, " (code 0x%04x)", ev.code);
                    if (ev.result == TALLY_ERR_MODE_REFUSED)
                        fprintf(stderr, "; the server does not accept the %s mode: not retried in the other one",
                                mode == TALLY_MODE_ENCRYPTED ? "encrypted" : "authenticated");
                    fprintf(stderr, "\n");
                } else if (status == 0) {
                    exit_code = 0;
                }
                break;
            default:
                break;
            }
        }
        /* 2. What it has to send. */
        size_t n;
        while ((n = tally_client_transmit(c, buf, sizeof buf)) > 0) {
            if (send_all(fd, buf, n) != 0) { tally_client_receive_eof(c, now_ms()); break; }
        }
        if (tally_client_is_finished(c)) break;
        /* 3. Wait for bytes, or for its next deadline. */
        int64_t at = tally_client_next_timeout(c);
        int64_t wait = at < 0 ? -1 : at - (int64_t)now_ms();
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int ready = poll(&p, 1, wait < 0 ? (at < 0 ? -1 : 0) : (int)wait);
        if (ready < 0 && errno != EINTR) break;
        if (ready > 0) {
            ssize_t got = recv(fd, buf, sizeof buf, 0);
            if (got > 0) tally_client_receive(c, buf, (size_t)got, now_ms());
            else if (got == 0 || errno != EINTR) tally_client_receive_eof(c, now_ms());
        } else if (ready == 0) {
            tally_client_handle_timeout(c, now_ms());
        }
    }
    tally_client_free(c);
    close(fd);
    return exit_code;
}
