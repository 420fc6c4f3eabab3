/* Enrolls this device and writes its credential file (mode 0600).
 *
 *     enroll SERVER ID CREDENTIAL-FILE < TOKEN-FILE
 *
 * The enrollment token (`tallyd token`, or `tallyd token --id ID`) is read from stdin,
 * or from $TALLY_TOKEN: never from the command line, where other users could read it.
 * The file written is the one `tally enroll` writes (spec/PROTOCOL.md section 9.2). */
#include "common.h"
#include "tally.h"

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s SERVER ID CREDENTIAL-FILE < TOKEN-FILE\n", argv[0]);
        return 2;
    }
    const char *server = argv[1], *id = argv[2], *out = argv[3];
    char token[256] = "";
    const char *env = getenv("TALLY_TOKEN");
    if (env) {
        snprintf(token, sizeof token, "%s", env);
    } else if (!fgets(token, sizeof token, stdin)) {
        fprintf(stderr, "no enrollment token on stdin\n");
        return 1;
    }
    uint8_t ephemeral[32];
    if (random_bytes(ephemeral) != 0) { fprintf(stderr, "no random bytes\n"); return 1; }
    TallyEnrollment *e = tally_enroll_new(token, id, &ephemeral);
    memset(token, 0, sizeof token);
    memset(ephemeral, 0, sizeof ephemeral);
    if (!e) { fprintf(stderr, "invalid enrollment token or id\n"); return 1; }
    int fd = dial(server);
    if (fd < 0) { fprintf(stderr, "cannot connect to %s\n", server); tally_enroll_free(e); return 1; }

    uint8_t buf[512];
    int result;
    uint64_t deadline = now_ms() + 10000;
    for (;;) {
        size_t n;
        while ((n = tally_enroll_transmit(e, buf, sizeof buf)) > 0) send_all(fd, buf, n);
        if ((result = tally_enroll_result(e, NULL)) != 1) break;
        int64_t wait = (int64_t)deadline - (int64_t)now_ms();
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (wait <= 0 || poll(&p, 1, (int)wait) == 0) { result = TALLY_ERR_TIMEOUT; break; }
        ssize_t got = recv(fd, buf, sizeof buf, 0);
        if (got > 0) tally_enroll_receive(e, buf, (size_t)got);
        else tally_enroll_receive_eof(e);
    }
    close(fd);
    uint16_t code = 0;
    if (result != TALLY_OK) {
        tally_enroll_result(e, &code);
        fprintf(stderr, "enrollment of %s at %s: %s", id, server, tally_result_string(result));
        if (code) fprintf(stderr, " (code 0x%04x)", code);
        fprintf(stderr, "\n");
        tally_enroll_free(e);
        return 1;
    }
    uint8_t key[32];
    tally_enroll_key(e, &key);
    tally_enroll_free(e);

    /* Written under a temporary name with mode 0600, then renamed: never half a file. */
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", out);
    int cf = open(tmp, O_WRONLY | O_CREAT | O_EXCL, 0600);
    FILE *f = cf < 0 ? NULL : fdopen(cf, "w");
    if (!f) { fprintf(stderr, "%s: %s\n", tmp, strerror(errno)); return 1; }
    fprintf(f, "# Tally device credential (spec/PROTOCOL.md section 9.2). Secret: keep it mode 0600.\n");
    fprintf(f, "tally-credential = 1\nid = \"%s\"\nkey = \"", id);
    for (int i = 0; i < 32; i++) fprintf(f, "%02x", key[i]);
    fprintf(f, "\"\nserver = \"%s\"\n", server);
    memset(key, 0, sizeof key);
    if (fflush(f) != 0 || fsync(cf) != 0 || fclose(f) != 0 || rename(tmp, out) != 0) {
        fprintf(stderr, "%s: %s\n", out, strerror(errno));
        unlink(tmp);
        return 1;
    }
    fprintf(stderr, "enrolled %s at %s; credential written to %s\n", id, server, out);
    return 0;
}
