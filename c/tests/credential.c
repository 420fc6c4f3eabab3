/* The credential reader of examples/common.h (`read_credential`) on files it must read
 * and files it must refuse; run by `make -C c` (target `check`). The refusals are what
 * the fuzz target `c_credential` found it misreading: each was read with other values
 * than a TOML parser reads (the Rust client's, spec 9.2). */
#include "common.h"

#define KEY "0707070707070707070707070707070707070707070707070707070707070707"
/* A canonical S (spec 9.1: the last byte below 0x80). */
#define SKEY "ababababababababababababababababababababababababababababababab2b"

static int failures;

static void check(const char *text, int ok, const char *id, const char *server) {
    char path[] = "/tmp/tally-credential-test.XXXXXX";
    int fd = mkstemp(path); /* mode 0600 */
    if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text)) {
        perror("temporary file");
        exit(2);
    }
    close(fd);
    struct credential c;
    int err = dup(2), null = open("/dev/null", O_WRONLY);
    dup2(null, 2); /* its refusals' messages */
    int r = read_credential(path, &c);
    dup2(err, 2);
    close(null);
    close(err);
    unlink(path);
    int got = r == 0;
    if (got != ok || (ok && (strcmp(c.id, id) != 0 || strcmp(c.server, server) != 0 || c.key[31] != 7 || c.server_key[0] != 0xab))) {
        fprintf(stderr, "FAIL: %s: %s\n---\n%s---\n", ok ? "not read as expected" : "read", got ? c.server : "", text);
        failures++;
    }
}

int main(void) {
    /* What `tally enroll` writes, CRLF, comments, unknown entries, tabs, upper case. */
    check("# Tally device credential\ntally-credential = 1\nid = \"sensor-42\"\nkey = \"" KEY "\"\nserver-key = \"" SKEY "\"\nserver = \"127.0.0.1:7420\"\n",
          1, "sensor-42", "127.0.0.1:7420");
    check("tally-credential = 1\r\nid=\"a\"\r\n\tkey\t=\t\"" KEY "\" # k\r\nserver-key = \"" SKEY "\"\r\nserver = \"[::1]:7420\"\r\nnote = 'x'\r\ntally-credentials = 5\r\n",
          1, "a", "[::1]:7420");
    /* An escape: a TOML parser reads a\b, the reader read a\\b. */
    check("tally-credential = 1\nid = \"a\"\nkey = \"" KEY "\"\nserver-key = \"" SKEY "\"\nserver = \"a\\\\b:1\"\n", 0, 0, 0);
    /* A multi-line string hides a line from a TOML parser. */
    check("tally-credential = 1\nid = \"a\"\nkey = \"" KEY "\"\nserver-key = \"" SKEY "\"\nserver = \"good:1\"\nnote = \"\"\"\nserver = \"evil:1\"\n\"\"\"\n", 0, 0, 0);
    check("tally-credential = 1\nid = \"a\"\nkey = \"" KEY "\"\nserver-key = \"" SKEY "\"\nserver = \"good:1\"\nnote = '''\nserver = \"evil:1\"\n'''\n", 0, 0, 0);
    check("tally-credential = 1\nid = \"a\"\nkey = \"" KEY "\"\nserver = \"good:1\"\nnote = [ \"\"\"\nserver = \"evil:1\"\n\"\"\" ]\n", 0, 0, 0);
    /* """ in a comment opens nothing (it was refused at first: found by the fuzz target). */
    check("tally-credential = 1\nid = \"a\"  # \"\"\"\nkey = \"" KEY "\" # '''\nserver = \"s:1\"\nserver-key = \"" SKEY "\"\n", 1, "a", "s:1");
    /* A table moves the entries after it out of the credential. */
    check("tally-credential = 1\nid = \"a\"\nkey = \"" KEY "\"\nserver-key = \"" SKEY "\"\nserver = \"good:1\"\n[t]\nserver = \"evil:1\"\n", 0, 0, 0);
    /* A line longer than the buffer: its end read as a line of its own. */
    {
        char text[1024] = "tally-credential = 1\nid = \"a\"\nkey = \"" KEY "\"\nserver-key = \"" SKEY "\"\nserver = \"good:1\"\n# ";
        size_t n = strlen(text);
        memset(text + n, 'x', 509);
        strcpy(text + n + 509, "server = \"evil:1\"\n");
        check(text, 0, 0, 0);
    }
    /* `tally-credentials` is another entry, not the version (it was read as version 0). */
    check("tally-credential = 1\ntally-credentials = 2\nid = \"a\"\nkey = \"" KEY "\"\nserver-key = \"" SKEY "\"\nserver = \"s:1\"\n", 1, "a", "s:1");
    /* Duplicates, text after a value, control characters, an id outside spec 4.1. */
    check("tally-credential = 1\nid = \"a\"\nid = \"b\"\nkey = \"" KEY "\"\nserver-key = \"" SKEY "\"\nserver = \"s:1\"\n", 0, 0, 0);
    check("tally-credential = 1\nid = \"a\"x\nkey = \"" KEY "\"\nserver-key = \"" SKEY "\"\nserver = \"s:1\"\n", 0, 0, 0);
    check("tally-credential = 1\nid = \"a\"\nkey = \"" KEY "\"\nserver-key = \"" SKEY "\"\nserver = \"s\x01:1\"\n", 0, 0, 0);
    check("tally-credential = 1\nid = \"a b\"\nkey = \"" KEY "\"\nserver-key = \"" SKEY "\"\nserver = \"s:1\"\n", 0, 0, 0);
    /* Spec 9.2: server-key is required, read in upper case, 64 hex digits. */
    check("tally-credential = 1\nid = \"a\"\nkey = \"" KEY "\"\nserver = \"s:1\"\n", 0, 0, 0);
    check("tally-credential = 1\nid = \"a\"\nkey = \"" KEY "\"\nserver = \"s:1\"\nserver-key = \"ABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABAB2B\"\n",
          1, "a", "s:1");
    check("tally-credential = 1\nid = \"a\"\nkey = \"" KEY "\"\nserver = \"s:1\"\nserver-key = \"abab\"\n", 0, 0, 0);
    check("tally-credential = 1\nid = \"a\"\nkey = \"" KEY "\"\nserver = \"s:1\"\nserver-key = \"" SKEY "\"\nserver-key = \"" SKEY "\"\n", 0, 0, 0);
    /* Spec 9.1, 9.2: a server-key whose top bit (of its last byte) is set is refused,
     * in either case; 7f is the largest last byte that is read. */
    check("tally-credential = 1\nid = \"a\"\nkey = \"" KEY "\"\nserver = \"s:1\"\nserver-key = \"abababababababababababababababababababababababababababababababab\"\n", 0, 0, 0);
    check("tally-credential = 1\nid = \"a\"\nkey = \"" KEY "\"\nserver = \"s:1\"\nserver-key = \"ABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABAB80\"\n", 0, 0, 0);
    check("tally-credential = 1\nid = \"a\"\nkey = \"" KEY "\"\nserver = \"s:1\"\nserver-key = \"ababababababababababababababababababababababababababababababab7f\"\n", 1, "a", "s:1");
    check("tally-credential = 10\nid = \"a\"\nkey = \"" KEY "\"\nserver-key = \"" SKEY "\"\nserver = \"s:1\"\n", 0, 0, 0);
    if (failures) return 1;
    return 0;
}
