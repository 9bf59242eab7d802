/* vsock-tool: the two ends of a vsock round trip for tests/lab/virtio_vsock.sh, built static
 * on the host (busybox has no vsock tools).
 *   vsock-tool listen PORT            guest: accept one AF_VSOCK stream, echo it until EOF
 *   vsock-tool connect CID PORT MSG   guest: connect, send MSG, print the reply, close
 *   vsock-tool uds-connect PATH PORT MSG  host: `CONNECT PORT` on PATH, send MSG, print the echo
 *   vsock-tool uds-serve PATH         host: accept one unix stream, answer "re:" + what came
 * Every wait is bounded by a 10 s receive timeout. */
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static void timeout(int s) {
    struct timeval tv = {10, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

static int die(const char *what) {
    perror(what);
    return 1;
}

/* Reads until `want` bytes or EOF/timeout; returns the count. */
static int read_n(int s, char *buf, int want) {
    int got = 0;
    while (got < want) {
        int n = read(s, buf + got, want - got);
        if (n <= 0) break;
        got += n;
    }
    return got;
}

int main(int argc, char **argv) {
    char buf[65536];
    if (argc == 3 && !strcmp(argv[1], "listen")) {
        int l = socket(AF_VSOCK, SOCK_STREAM, 0);
        struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY,
                                .svm_port = atoi(argv[2])};
        if (l < 0 || bind(l, (void *)&a, sizeof a) || listen(l, 1)) return die("vsock listen");
        printf("VS-LISTENING %s\n", argv[2]);
        fflush(stdout);
        int s = accept(l, NULL, NULL);
        if (s < 0) return die("accept");
        long total = 0;
        int n;
        while ((n = read(s, buf, sizeof buf)) > 0) {
            if (write(s, buf, n) != n) return die("write");
            total += n;
        }
        printf("VS-ECHOED %ld\n", total);
        return 0;
    }
    if (argc == 5 && !strcmp(argv[1], "connect")) {
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = atoi(argv[2]),
                                .svm_port = atoi(argv[3])};
        if (s < 0 || connect(s, (void *)&a, sizeof a)) return die("vsock connect");
        timeout(s);
        int len = strlen(argv[4]);
        if (write(s, argv[4], len) != len) return die("write");
        int n = read_n(s, buf, len + 3);
        printf("VS-REPLY %.*s\n", n, buf);
        return 0;
    }
    if ((argc == 5 && !strcmp(argv[1], "uds-connect")) || (argc == 3 && !strcmp(argv[1], "uds-serve"))) {
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        strncpy(a.sun_path, argv[2], sizeof a.sun_path - 1);
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        if (argv[1][4] == 's') {
            unlink(argv[2]);
            if (s < 0 || bind(s, (void *)&a, sizeof a) || listen(s, 1)) return die("uds listen");
            printf("VS-SERVING\n");
            fflush(stdout);
            int c = accept(s, NULL, NULL);
            if (c < 0) return die("accept");
            timeout(c);
            int n = read(c, buf + 3, sizeof buf - 3);
            if (n <= 0) return die("read");
            memcpy(buf, "re:", 3);
            if (write(c, buf, n + 3) != n + 3) return die("write");
            printf("VS-SERVED %.*s\n", n, buf + 3);
            read(c, buf, 1); /* until the guest closes */
            return 0;
        }
        if (s < 0 || connect(s, (void *)&a, sizeof a)) return die("uds connect");
        timeout(s);
        int k = snprintf(buf, sizeof buf, "CONNECT %s\n", argv[3]);
        if (write(s, buf, k) != k) return die("write");
        int n = 0;
        while (n < (int)sizeof buf - 1 && read(s, buf + n, 1) == 1 && buf[n] != '\n') n++;
        printf("VS-OK-LINE %.*s\n", n, buf);
        int len = strlen(argv[4]);
        if (write(s, argv[4], len) != len) return die("write");
        n = read_n(s, buf, len);
        printf("VS-ECHO %.*s\n", n, buf);
        return 0;
    }
    fprintf(stderr, "usage: see the header of vsock-tool.c\n");
    return 2;
}
