/* Enrolls this device and writes its credential file (mode 0600).
 *
 *     enroll SERVER ID CREDENTIAL-FILE < TOKEN-FILE
 *
 * The enrollment token (`tallyd token`, or `tallyd token --id ID`) is read from stdin,
 * or from $TALLY_TOKEN: never from the command line, where other users could read it.
 * The file written is the one `tally enroll` writes (spec/PROTOCOL.md section 9.2); an
 * existing one is not overwritten. The file is prepared before the exchange, so that a
 * key the server stored is never lost for want of a place to put it. */
#include "common.h"
#include "tally.h"

#include <libgen.h>

/* Each answer of the server may take up to 10 s (a refusal may come 7.5 s late). */
#define ANSWER_TIMEOUT_MS 10000

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s SERVER ID CREDENTIAL-FILE < TOKEN-FILE\n", argv[0]);
        return 2;
    }
    const char *server = argv[1], *id = argv[2], *out = argv[3];
    /* The library linked in must be the one tally.h describes. */
    if (tally_abi_version() != TALLY_ABI_VERSION) {
        fprintf(stderr, "libtally_c has ABI version %u, tally.h %u: rebuild against the library's header\n",
                (unsigned)tally_abi_version(), (unsigned)TALLY_ABI_VERSION);
        return 1;
    }
    if (access(out, F_OK) == 0) {
        fprintf(stderr, "%s exists: remove it first (its identity would be lost)\n", out);
        return 1;
    }
    /* The temporary file, in the same directory, before anything is enrolled. */
    char tmp[4096], dir[4096];
    if (snprintf(tmp, sizeof tmp, "%s.XXXXXX", out) >= (int)sizeof tmp) return 2;
    snprintf(dir, sizeof dir, "%s", out);
    int cf = mkstemp(tmp); /* mode 0600 */
    if (cf < 0) { fprintf(stderr, "%s: %s\n", tmp, strerror(errno)); return 1; }

    char token[256] = "";
    const char *env = getenv("TALLY_TOKEN");
    if (env) {
        snprintf(token, sizeof token, "%s", env);
    } else if (!fgets(token, sizeof token, stdin)) {
        fprintf(stderr, "no enrollment token on stdin\n");
        unlink(tmp);
        return 1;
    }
    uint8_t ephemeral[32];
    int have_random = random_bytes(ephemeral) == 0;
    TallyEnrollment *e = have_random ? tally_enroll_new(token, id, &ephemeral) : NULL;
    wipe(token, sizeof token);
    wipe(ephemeral, sizeof ephemeral);
    int fd = e ? dial(server) : -1;
    if (fd < 0) {
        fprintf(stderr, !have_random ? "no random bytes\n"
                        : !e         ? "invalid enrollment token or id\n"
                                     : "cannot connect to the server\n");
        tally_enroll_free(e);
        unlink(tmp);
        return 1;
    }

    uint8_t buf[512];
    int result;
    uint64_t deadline = now_ms() + ANSWER_TIMEOUT_MS;
    for (;;) {
        size_t n;
        while ((n = tally_enroll_transmit(e, buf, sizeof buf)) > 0) {
            if (send_all(fd, buf, n) != 0) { tally_enroll_receive_eof(e); break; }
        }
        if ((result = tally_enroll_result(e, NULL)) != 1) break;
        int64_t wait = (int64_t)deadline - (int64_t)now_ms();
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int ready = wait > 0 ? poll(&p, 1, (int)wait) : 0;
        if (ready < 0 && errno == EINTR) continue;
        if (ready <= 0) { tally_enroll_timeout(e); continue; }
        ssize_t got = recv(fd, buf, sizeof buf, 0);
        if (got > 0) {
            tally_enroll_receive(e, buf, (size_t)got);
            deadline = now_ms() + ANSWER_TIMEOUT_MS;
        } else if (got == 0 || errno != EINTR) {
            tally_enroll_receive_eof(e);
        }
    }
    close(fd);
    if (result != TALLY_OK) {
        uint16_t code = 0;
        tally_enroll_result(e, &code);
        fprintf(stderr, "enrollment of %s at %s: %s", id, server, tally_result_string(result));
        if (code) fprintf(stderr, " (code 0x%04x)", code);
        if (result == TALLY_ERR_UNCONFIRMED)
            fprintf(stderr, "; do not enroll again: ask the operator to `tallyd remove %s` first", id);
        fprintf(stderr, "\n");
        tally_enroll_free(e);
        unlink(tmp);
        return 1;
    }
    uint8_t key[32], server_key[32];
    tally_enroll_key(e, &key);
    tally_enroll_server_key(e, &server_key); /* S, pinned by the token: the encrypted mode needs it */
    tally_enroll_free(e);

    FILE *f = fdopen(cf, "w");
    int ok = f != NULL;
    if (ok) {
        setvbuf(f, NULL, _IONBF, 0); /* no copy of the key in a stdio buffer */
        fprintf(f, "# Tally device credential (spec/PROTOCOL.md section 9.2). Secret: keep it mode 0600.\n");
        fprintf(f, "tally-credential = 1\nid = \"%s\"\nkey = \"", id);
        for (int i = 0; i < 32; i++) fprintf(f, "%02x", key[i]);
        fprintf(f, "\"\nserver = \"%s\"\nserver-key = \"", server);
        for (int i = 0; i < 32; i++) fprintf(f, "%02x", server_key[i]);
        fprintf(f, "\"\n");
    }
    wipe(key, sizeof key);
    /* Written, flushed to disk, renamed into place, and the rename made durable. */
    ok = ok && fflush(f) == 0 && fsync(cf) == 0;
    ok = (f ? fclose(f) == 0 : 0) && ok;
    ok = ok && rename(tmp, out) == 0;
    if (ok) {
        int d = open(dirname(dir), O_RDONLY);
        ok = d >= 0 && fsync(d) == 0;
        if (d >= 0) close(d);
    }
    if (!ok) {
        fprintf(stderr, "%s: %s (the server stored %s: keep %s if it exists)\n", out,
                strerror(errno), id, tmp);
        return 1;
    }
    fprintf(stderr, "enrolled %s at %s; credential written to %s\n", id, server, out);
    return 0;
}
