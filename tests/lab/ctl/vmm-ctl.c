/* vmm-ctl SOCKET JSON: sends one request line to a ferro-vmm control socket (--control) and
 * prints the answer line (the first line with a "result"; events are skipped) on stdout. Exit
 * status 0 when the answer is {"result":"ok",...}, 1 otherwise. For lab scripts, where busybox has no
 * unix-socket client. Static: the lab has no C library of its own besides what ldd packs. */
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: vmm-ctl SOCKET JSON\n");
        return 2;
    }
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (fd < 0 || strlen(argv[1]) >= sizeof(a.sun_path)) {
        fprintf(stderr, "vmm-ctl: bad socket\n");
        return 1;
    }
    strcpy(a.sun_path, argv[1]);
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
        perror("vmm-ctl: connect");
        return 1;
    }
    size_t n = strlen(argv[2]);
    if (write(fd, argv[2], n) != (ssize_t)n || write(fd, "\n", 1) != 1) {
        perror("vmm-ctl: write");
        return 1;
    }
    static char line[1 << 16];
    size_t len = 0;
    for (;;) {
        char c;
        ssize_t r = read(fd, &c, 1);
        if (r <= 0) {
            fprintf(stderr, "vmm-ctl: the VMM closed the socket without an answer\n");
            return 1;
        }
        if (c != '\n') {
            if (len + 1 < sizeof(line))
                line[len++] = c;
            continue;
        }
        line[len] = 0;
        len = 0;
        if (!strstr(line, "\"result\""))
            continue; /* an event, not our answer */
        puts(line);
        return strstr(line, "\"result\":\"ok\"") ? 0 : 1;
    }
}
