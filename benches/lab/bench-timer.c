/*
 * bench-timer: times one command inside the KVM lab, where busybox sh has no sub-second clock.
 *
 *   bench-timer [-t TIMEOUT_S] [-m MARKER] -- COMMAND [ARG]...
 *
 * Spawns COMMAND (stdin /dev/null, stdout and stderr on pipes), reads its stdout unbuffered and
 * prints one line on stdout when it has ended:
 *   first_byte_ms=F marker_ms=M exit_ms=E status=S
 * times in ms from just before fork; M and F are -1 if never seen; S is the exit status,
 * sigN for a signal, or timeout (the command is killed after TIMEOUT_S, default 120).
 * If the marker was missed or the status is not 0, the last bytes of the command's output go
 * to stderr for diagnosis. Built by ferro-bench with `cc -O2 -static`.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

#define TAIL 2048

static double ms_since(const struct timespec *t0)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)(t.tv_sec - t0->tv_sec) * 1e3 + (double)(t.tv_nsec - t0->tv_nsec) / 1e6;
}

/* Keeps the last TAIL bytes of the output. */
static char tail[TAIL];
static size_t tail_len;
static void keep(const char *p, size_t n)
{
	if (n >= TAIL) {
		memcpy(tail, p + n - TAIL, TAIL);
		tail_len = TAIL;
		return;
	}
	if (tail_len + n > TAIL) {
		size_t drop = tail_len + n - TAIL;
		memmove(tail, tail + drop, tail_len - drop);
		tail_len -= drop;
	}
	memcpy(tail + tail_len, p, n);
	tail_len += n;
}

int main(int argc, char **argv)
{
	double timeout_s = 120;
	const char *marker = NULL;
	int i = 1;
	for (; i < argc; i++) {
		if (!strcmp(argv[i], "-t") && i + 1 < argc)
			timeout_s = atof(argv[++i]);
		else if (!strcmp(argv[i], "-m") && i + 1 < argc)
			marker = argv[++i];
		else if (!strcmp(argv[i], "--")) {
			i++;
			break;
		} else
			break;
	}
	if (i >= argc) {
		fprintf(stderr, "usage: bench-timer [-t TIMEOUT_S] [-m MARKER] -- COMMAND [ARG]...\n");
		return 2;
	}
	size_t mlen = marker ? strlen(marker) : 0;

	int out[2], err[2];
	if (pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0) {
		perror("bench-timer: pipe");
		return 2;
	}
	struct timespec t0;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	pid_t pid = fork();
	if (pid < 0) {
		perror("bench-timer: fork");
		return 2;
	}
	if (pid == 0) {
		int devnull = open("/dev/null", O_RDONLY);
		if (devnull >= 0)
			dup2(devnull, 0);
		dup2(out[1], 1);
		dup2(err[1], 2);
		execvp(argv[i], argv + i);
		fprintf(stderr, "bench-timer: exec %s: %s\n", argv[i], strerror(errno));
		_exit(127);
	}
	close(out[1]);
	close(err[1]);
	int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);

	double first = -1, mark = -1, exited_ms = -1;
	int status = 0, have_status = 0, timed_out = 0;
	/* Marker search window: the previous chunk's last mlen-1 bytes plus the new chunk. */
	char win[65536 + 256];
	size_t carry = 0;
	int out_open = 1, err_open = 1;
	char buf[65536];
	for (;;) {
		struct pollfd p[3];
		int np = 0, io = -1, ie = -1, ip = -1;
		if (out_open) { io = np; p[np].fd = out[0]; p[np++].events = POLLIN; }
		if (err_open) { ie = np; p[np].fd = err[0]; p[np++].events = POLLIN; }
		if (!have_status && pidfd >= 0) { ip = np; p[np].fd = pidfd; p[np++].events = POLLIN; }
		if (np == 0)
			break;
		double left_ms = have_status ? exited_ms + 2000 - ms_since(&t0) : timeout_s * 1e3 - ms_since(&t0);
		if (!have_status && pidfd < 0 && !out_open && !err_open)
			left_ms = left_ms < 1 ? left_ms : 1;
		int r = poll(p, (nfds_t)np, left_ms < 0 ? 0 : (int)left_ms + 1);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			perror("bench-timer: poll");
			break;
		}
		if (r == 0) {
			if (have_status)
				break; /* output still held open after exit: stop draining */
			if (ms_since(&t0) >= timeout_s * 1e3) {
				kill(pid, SIGKILL);
				timed_out = 1;
			}
			if (waitpid(pid, &status, timed_out ? 0 : WNOHANG) == pid) {
				have_status = 1;
				exited_ms = ms_since(&t0);
			}
			continue;
		}
		if (io >= 0 && (p[io].revents & (POLLIN | POLLHUP | POLLERR))) {
			ssize_t n = read(out[0], buf, sizeof(buf));
			if (n <= 0) {
				out_open = 0;
			} else {
				double now = ms_since(&t0);
				if (first < 0)
					first = now;
				keep(buf, (size_t)n);
				if (marker && mark < 0) {
					memcpy(win + carry, buf, (size_t)n);
					size_t wl = carry + (size_t)n;
					if (memmem(win, wl, marker, mlen))
						mark = now;
					carry = mlen > 1 ? (wl < mlen - 1 ? wl : mlen - 1) : 0;
					if (mlen > 256)
						carry = 0;
					memmove(win, win + wl - carry, carry);
				}
			}
		}
		if (ie >= 0 && (p[ie].revents & (POLLIN | POLLHUP | POLLERR))) {
			ssize_t n = read(err[0], buf, sizeof(buf));
			if (n <= 0)
				err_open = 0;
			else
				keep(buf, (size_t)n);
		}
		if (ip >= 0 && (p[ip].revents & POLLIN)) {
			if (waitpid(pid, &status, 0) == pid) {
				have_status = 1;
				exited_ms = ms_since(&t0);
			}
		}
		if (!have_status && pidfd < 0 && !out_open && !err_open) {
			if (waitpid(pid, &status, WNOHANG) == pid) {
				have_status = 1;
				exited_ms = ms_since(&t0);
			}
		}
	}
	if (!have_status) {
		waitpid(pid, &status, 0);
		exited_ms = ms_since(&t0);
	}

	char st[32];
	if (timed_out)
		snprintf(st, sizeof(st), "timeout");
	else if (WIFEXITED(status))
		snprintf(st, sizeof(st), "%d", WEXITSTATUS(status));
	else if (WIFSIGNALED(status))
		snprintf(st, sizeof(st), "sig%d", WTERMSIG(status));
	else
		snprintf(st, sizeof(st), "unknown");
	printf("first_byte_ms=%.3f marker_ms=%.3f exit_ms=%.3f status=%s\n", first, mark, exited_ms, st);
	fflush(stdout);
	if ((marker && mark < 0) || strcmp(st, "0")) {
		fprintf(stderr, "bench-timer: %s: status %s, marker %s; last output:\n", argv[i], st,
			mark < 0 ? "not seen" : "seen");
		fwrite(tail, 1, tail_len, stderr);
		fprintf(stderr, "\nbench-timer: end of output\n");
	}
	return 0;
}
